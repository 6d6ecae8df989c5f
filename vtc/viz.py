"""Pictures of what a strategy kept: token overlays on the image."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageOps


def model_view(image: Image.Image, size: int) -> Image.Image:
    """The square the LLaVA-1.5 image processor feeds the vision tower: shortest edge resized, centre crop."""
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)


def overlay_kept(
    image: Image.Image,
    kept: torch.Tensor | list[int],
    grid: tuple[int, int],
    *,
    size: int = 336,
    dim: float = 0.75,
    title: str | None = None,
    display: int = 256,
) -> Image.Image:
    """The image as the model sees it, with dropped tokens dimmed and kept tokens outlined.

    kept: indices into the image's raster-ordered token grid (e.g. `handle.last_kept()[0]`).
    size: the vision tower's input size; display: the panel's size (at least `size`)."""
    rows, cols = grid
    view = model_view(image, size)
    if display > size:
        view = view.resize((display, display), Image.Resampling.NEAREST)
    kept_set = {int(i) for i in kept}
    shade = Image.new("RGBA", view.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    cell_w, cell_h = view.width / cols, view.height / rows
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        box = [c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1]
        if index in kept_set:
            draw.rectangle(box, outline=(255, 220, 0, 255), width=max(1, int(min(cell_w, cell_h) // 12)))
        else:
            draw.rectangle(box, fill=(0, 0, 0, int(255 * dim)))
    out = Image.alpha_composite(view.convert("RGBA"), shade).convert("RGB")
    label = title if title is not None else f"kept {len(kept_set)}/{rows * cols} tokens"
    return _with_caption(out, label)


def _with_caption(image: Image.Image, text: str) -> Image.Image:
    band = 18
    canvas = Image.new("RGB", (image.width, image.height + band), "white")
    canvas.paste(image, (0, band))
    ImageDraw.Draw(canvas).text((4, 3), text, fill="black")
    return canvas


def side_by_side(images: list[Image.Image], gap: int = 6) -> Image.Image:
    """Panels left to right on a white background."""
    height = max(im.height for im in images)
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas
