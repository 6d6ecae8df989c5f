"""Pictures of what a strategy kept: token overlays on images and video frames, per-layer token counts.

    overlay_kept(image, handle.last_kept()[0], handle.adapter.grid())   # PIL image: dropped patches dimmed
    overlay_tokens(view, kept, partitions, groups=...)                 # any layout: crops, merged groups
    plot_layer_counts(handle.report())                                 # matplotlib figure: tokens per layer
    frame_strip(frames, handle.last_kept()[0], grid, budgets=...)      # PIL image: one panel per frame
    save(picture, "out/overlay.png")                                   # a PIL image or a figure as PNG

Token indices are the ones `handle.last_kept()` returns: positions in the concatenation of the partitions'
raster-ordered grids (one partition for a LLaVA-1.5 image; a base image plus its crops for anyres layouts).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

KEPT_COLOUR = (255, 220, 0)
"""Outline of a kept token's cell."""
CROP_COLOUR = (0, 190, 255)
"""Border of a crop (partition) when a panel holds more than one."""
CAPTION_HEIGHT = 24
"""Height of the title band above each overlay panel."""
GAP = 6
"""Space between panels."""
GROUP_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (67, 99, 216),
    (245, 130, 49),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (188, 246, 12),
    (0, 128, 128),
    (154, 99, 36),
    (255, 250, 200),
    (128, 0, 0),
)
"""Fill colours of merged groups, cycled in order of first appearance."""


@dataclass(frozen=True)
class Partition:
    """One token grid laid over a region of the view.

    grid: (rows, cols) of tokens, raster order. box: (x0, y0, x1, y1) as fractions of the view's width and
    height (the whole view by default). label: drawn in the region's corner when the panel holds crops."""

    grid: tuple[int, int]
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    label: str | None = None

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


PartitionLike = Partition | tuple


def as_partitions(partitions: Sequence[PartitionLike] | tuple[int, int]) -> list[Partition]:
    """Normalise a grid `(rows, cols)`, or a list of `Partition` / `(grid, box)` / `(grid, box, label)`."""
    if len(partitions) == 2 and all(isinstance(v, int) for v in partitions):
        return [Partition(tuple(partitions))]
    out = []
    for p in partitions:
        if isinstance(p, Partition):
            out.append(p)
        else:
            grid, box, *label = p
            box = (0.0, 0.0, 1.0, 1.0) if box is None else tuple(float(v) for v in box)
            out.append(Partition(tuple(int(v) for v in grid), box, label[0] if label else None))
    return out


def anyres_partitions(base_grid: tuple[int, int], crop_grid: tuple[int, int], crops: tuple[int, int]):
    """The layout of an anyres image (LLaVA-NeXT style): a base view of the whole image, then a
    rows x cols array of crops, each with its own token grid, in raster order. `crops` = (rows, cols)."""
    rows, cols = crops
    parts = [Partition(tuple(base_grid), label="base")]
    for r in range(rows):
        for c in range(cols):
            box = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            parts.append(Partition(tuple(crop_grid), box, f"crop {r * cols + c + 1}"))
    return parts


def partitions_from_units(units: Sequence[Mapping], stitched_grid: tuple[int, int] | None = None):
    """(partitions, kept) for `overlay_tokens` from one image's units as `kept_by_unit(handle)` gives them
    (LLaVA-NeXT / OneVision adapters): a dict per unit with "role" ("base" or "crop"), "grid", "box" (row0,
    col0, row1, col1 in the stitched grid, end exclusive; None for the base) and "kept" (indices into the
    unit's grid). `stitched_grid`: the image's stitched grid (rows, cols), the view the crops tile."""
    parts, kept, offset = [], [], 0
    for unit in units:
        grid = tuple(int(v) for v in unit["grid"])
        if unit.get("box") is None:
            part = Partition(grid, label=str(unit.get("role", "base")))
        else:
            if stitched_grid is None:
                raise ValueError("units with crop boxes need stitched_grid=(rows, cols) of the image")
            rows, cols = stitched_grid
            r0, c0, r1, c1 = (int(v) for v in unit["box"])
            crop = unit.get("crop")
            label = f"crop {crop[0]},{crop[1]}" if crop is not None else str(unit.get("role", "crop"))
            part = Partition(grid, (c0 / cols, r0 / rows, c1 / cols, r1 / rows), label)
        parts.append(part)
        kept.extend(offset + int(i) for i in _as_index_set(unit.get("kept", ())))
        offset += part.n_tokens
    return parts, kept


# --- geometry ---------------------------------------------------------------------------------------------
def _overlaps(a: tuple, b: tuple) -> bool:
    eps = 1e-6
    return a[0] < b[2] - eps and b[0] < a[2] - eps and a[1] < b[3] - eps and b[1] < a[3] - eps


def _panels(partitions: list[Partition]) -> list[list[int]]:
    """Partitions split into panels so that the boxes within one panel do not overlap (first fit)."""
    panels: list[list[int]] = []
    for i, p in enumerate(partitions):
        for panel in panels:
            if not any(_overlaps(p.box, partitions[j].box) for j in panel):
                panel.append(i)
                break
        else:
            panels.append([i])
    return panels


def _panel_size(view: Image.Image, display: int) -> tuple[int, int]:
    scale = display / max(view.width, view.height)
    return max(1, round(view.width * scale)), max(1, round(view.height * scale))


def _cells(part: Partition, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (x0, y0, x1, y1 inclusive) of a partition's tokens in a panel of this size."""
    rows, cols = part.grid
    x0, y0, x1, y1 = part.box
    xs = [round((x0 + (x1 - x0) * c / cols) * width) for c in range(cols + 1)]
    ys = [round((y0 + (y1 - y0) * r / rows) * height) for r in range(rows + 1)]
    return [(xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1) for r in range(rows) for c in range(cols)]


def token_cells(
    partitions: Sequence[PartitionLike] | tuple[int, int], panel_size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Where each token's cell lies in the picture `overlay_tokens` returns for a view of `panel_size`
    pixels (after resizing to `display`): pixel boxes (x0, y0, x1, y1 inclusive), in token order."""
    parts = as_partitions(partitions)
    width, height = panel_size
    boxes: list = [None] * sum(p.n_tokens for p in parts)
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.n_tokens)
    for k, panel in enumerate(_panels(parts)):
        dx = k * (width + GAP)
        for i in panel:
            for t, (x0, y0, x1, y1) in enumerate(_cells(parts[i], width, height)):
                boxes[starts[i] + t] = (x0 + dx, y0 + CAPTION_HEIGHT, x1 + dx, y1 + CAPTION_HEIGHT)
    return boxes


# --- drawing ----------------------------------------------------------------------------------------------
@functools.cache
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str, size: int) -> int:
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=_font(size)))


def _fit_text(text: str, width: int, size: int) -> str:
    """`text`, shortened with an ellipsis when wider than `width` pixels."""
    if _text_width(text, size) <= width:
        return text
    while text and _text_width(text + "…", size) > width:
        text = text[:-1]
    return text + "…"


def _as_index_set(kept) -> set[int]:
    if isinstance(kept, torch.Tensor):
        return {int(i) for i in kept.flatten().tolist()}
    return {int(i) for i in kept}


def _group_ids(groups, n_tokens: int) -> list[int]:
    """groups: a mapping token -> group, or a sequence/tensor of length n_tokens (negative: no group)."""
    if groups is None:
        return [-1] * n_tokens
    if isinstance(groups, Mapping):
        ids = [-1] * n_tokens
        for token, group in groups.items():
            ids[int(token)] = int(group)
        return ids
    ids = [int(g) for g in (groups.flatten().tolist() if isinstance(groups, torch.Tensor) else groups)]
    if len(ids) != n_tokens:
        raise ValueError(f"groups has {len(ids)} entries for {n_tokens} tokens; pass one group id per token")
    return ids


def _legend_items(n_kept: int, n_dropped: int, n_merged: int, n_groups: int, crops: bool) -> list[tuple[str, str]]:
    items = [("kept", f"kept {n_kept}"), ("dropped", f"dropped {n_dropped}")]
    if n_groups:
        items.append(("merged", f"merged {n_merged} into {n_groups} groups"))
    if crops:
        items.append(("crop", "crop border"))
    return items


def legend_key(width: int, *, merged: bool = False, crops: bool = False, budget: bool = False) -> Image.Image:
    """The key alone, without counts, `width` pixels wide: for a gallery of panels drawn with legend=False."""
    items = [("kept", "kept token"), ("dropped", "dropped token (dimmed)")]
    if merged:
        items.append(("merged", "merged into a kept token (colour = group)"))
    if crops:
        items.append(("crop", "crop border"))
    if budget:
        items.append(("gauge", "kept share of the frame, | = budget"))
    return _draw_legend(width, items)


def _draw_legend(width: int, items: list[tuple[str, str]], size: int = 13) -> Image.Image:
    """Swatches and labels, flowed into as many lines as the width needs."""
    swatch, pad, line_h = 14, 8, 20
    lines: list[list[tuple[str, str]]] = [[]]
    x = pad
    for kind, label in items:
        w = swatch + 4 + _text_width(label, size) + 12
        if lines[-1] and x + w > width - pad:
            lines.append([])
            x = pad
        lines[-1].append((kind, label))
        x += w
    legend = Image.new("RGB", (width, 6 + line_h * len(lines)), "white")
    draw = ImageDraw.Draw(legend)
    for row, line in enumerate(lines):
        x, y = pad, 4 + row * line_h
        for kind, label in line:
            box = [x, y + 2, x + swatch - 1, y + 2 + swatch - 1]
            if kind == "kept":
                draw.rectangle(box, fill=(150, 150, 150), outline=KEPT_COLOUR, width=3)
            elif kind == "dropped":
                draw.rectangle(box, fill=(40, 40, 40))
            elif kind == "merged":
                half = (box[0] + box[2]) // 2
                draw.rectangle([box[0], box[1], half, box[3]], fill=GROUP_COLOURS[0])
                draw.rectangle([half + 1, box[1], box[2], box[3]], fill=GROUP_COLOURS[1])
            elif kind == "crop":
                draw.rectangle(box, outline=CROP_COLOUR, width=3)
            elif kind == "gauge":
                draw.rectangle([box[0], box[1] + 4, box[2], box[3] - 4], fill=(215, 215, 215))
                draw.rectangle([box[0], box[1] + 4, box[0] + 6, box[3] - 4], fill=(230, 180, 0))
                draw.rectangle([box[0] + 9, box[1], box[0] + 10, box[3]], fill="black")
            draw.text((x + swatch + 4, y + 1), label, fill="black", font=_font(size))
            x += swatch + 4 + _text_width(label, size) + 12
    return legend


def _with_caption(image: Image.Image, text: str, size: int = 15) -> Image.Image:
    canvas = Image.new("RGB", (image.width, image.height + CAPTION_HEIGHT), "white")
    canvas.paste(image, (0, CAPTION_HEIGHT))
    text = _fit_text(text, image.width - 8, size)
    ImageDraw.Draw(canvas).text((4, (CAPTION_HEIGHT - size) // 2 - 1), text, fill="black", font=_font(size))
    return canvas


def _stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height))
    return canvas


def overlay_tokens(
    view: Image.Image,
    kept,
    partitions: Sequence[PartitionLike] | tuple[int, int],
    *,
    groups=None,
    dim: float = 0.75,
    title: str | None = None,
    display: int = 256,
    legend: bool | None = None,
    caption_size: int = 15,
) -> Image.Image:
    """The view with dropped tokens dimmed, kept tokens outlined, merged groups coloured and crops framed.

    view: the image as the model sees it (e.g. `model_view(image, 336)`), shown with its long side at
        `display` pixels.
    kept: indices into the concatenation of the partitions' raster-ordered grids (`handle.last_kept()[0]`).
    partitions: a grid `(rows, cols)` covering the whole view, or a list of `Partition` / `(grid, box)`:
        each a token grid over a box of the view given as fractions (x0, y0, x1, y1). Partitions whose boxes
        overlap (an anyres base view and its crops) go to separate panels, left to right.
    groups: for merging strategies, a mapping token -> group id, or one id per token (negative: none). Tokens
        of groups with two or more members are tinted with the group's colour instead of dimmed.
    legend: the key below the panels; by default shown unless nothing is dimmed, merged or cropped.
    caption_size: the title's font size in pixels.
    """
    parts = as_partitions(partitions)
    n_tokens = sum(p.n_tokens for p in parts)
    kept_set = _as_index_set(kept)
    if kept_set and (min(kept_set) < 0 or max(kept_set) >= n_tokens):
        raise ValueError(f"kept holds indices outside [0, {n_tokens}): pass indices into this layout's tokens")
    group_of = _group_ids(groups, n_tokens)
    members: dict[int, int] = {}
    for g in group_of:
        if g >= 0:
            members[g] = members.get(g, 0) + 1
    merged_groups = [g for g in dict.fromkeys(group_of) if g >= 0 and members[g] > 1]
    colour_of = {g: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, g in enumerate(merged_groups)}

    width, height = _panel_size(view, display)
    method = Image.Resampling.NEAREST if width >= view.width else Image.Resampling.LANCZOS
    base = view.convert("RGB").resize((width, height), method)
    panels = _panels(parts)
    crops = any(len(panel) > 1 for panel in panels) or any(p.box != (0.0, 0.0, 1.0, 1.0) for p in parts)
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.n_tokens)

    pictures = []
    n_merged = 0
    for panel in panels:
        shade = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(shade)
        outlines = []
        for i in panel:
            cells = _cells(parts[i], width, height)
            for t, box in enumerate(cells):
                token = starts[i] + t
                group = group_of[token]
                if group in colour_of:
                    draw.rectangle(box, fill=(*colour_of[group], 140))
                    n_merged += token not in kept_set
                elif token not in kept_set:
                    draw.rectangle(box, fill=(0, 0, 0, int(255 * dim)))
                if token in kept_set:
                    outlines.append(box)
        picture = Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")
        draw = ImageDraw.Draw(picture)
        if crops:
            for i in panel:
                x0, y0, x1, y1 = parts[i].box
                box = [round(x0 * width), round(y0 * height), round(x1 * width) - 1, round(y1 * height) - 1]
                draw.rectangle(box, outline=CROP_COLOUR, width=2)
        for box in outlines:
            side = min(box[2] - box[0], box[3] - box[1]) + 1
            draw.rectangle(box, outline=KEPT_COLOUR, width=max(1, min(3, side // 10)))
        if crops:
            for i in panel:
                if parts[i].label:
                    x0, y0 = parts[i].box[:2]
                    at = (round(x0 * width) + 4, round(y0 * height) + 3)
                    draw.text(at, parts[i].label, fill=CROP_COLOUR, font=_font(12), stroke_width=2, stroke_fill="black")
        pictures.append(picture)

    label = title if title is not None else f"kept {len(kept_set)}/{n_tokens} tokens ({len(kept_set) / n_tokens:.0%})"
    out = _with_caption(side_by_side(pictures, gap=GAP) if len(pictures) > 1 else pictures[0], label, caption_size)
    if legend is None:
        legend = dim > 0 or bool(merged_groups) or crops
    if legend:
        n_dropped = n_tokens - len(kept_set) - n_merged
        items = _legend_items(len(kept_set), n_dropped, n_merged, len(merged_groups), crops)
        out = _stack(out, _draw_legend(out.width, items))
    return out


def model_view(image: Image.Image, size: int) -> Image.Image:
    """The square the LLaVA-1.5 image processor feeds the vision tower: shortest edge resized, centre crop."""
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)


def frame_view(image: Image.Image, size: int) -> Image.Image:
    """The whole image, its aspect ratio kept, with its long side at `size` pixels."""
    scale = size / max(image.width, image.height)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(shape, Image.Resampling.BICUBIC)


def centre_square(image: Image.Image) -> tuple[float, float, float, float]:
    """The centre square of an image as a box of fractions (x0, y0, x1, y1): what a centre crop keeps."""
    side = min(image.width, image.height)
    dx, dy = (image.width - side) / 2 / image.width, (image.height - side) / 2 / image.height
    return (dx, dy, 1.0 - dx, 1.0 - dy)


def overlay_kept(
    image: Image.Image,
    kept: torch.Tensor | list[int],
    grid: tuple[int, int],
    *,
    size: int = 336,
    dim: float = 0.75,
    title: str | None = None,
    display: int = 256,
    partitions: Sequence[PartitionLike] | None = None,
    groups=None,
    legend: bool | None = None,
) -> Image.Image:
    """The image as the model sees it, with dropped tokens dimmed and kept tokens outlined.

    kept: indices into the image's raster-ordered token grid (e.g. `handle.last_kept()[0]`).
    size: the vision tower's input size; display: the panel's size (at least `size`).
    partitions: instead of `grid`, an anyres layout (see `overlay_tokens`); groups: merged groups."""
    view = model_view(image, size)
    return overlay_tokens(
        view,
        kept,
        partitions if partitions is not None else [Partition(tuple(grid))],
        groups=groups,
        dim=dim,
        title=title,
        display=max(display, size),
        legend=legend,
    )


def side_by_side(images: list[Image.Image], gap: int = GAP) -> Image.Image:
    """Panels left to right on a white background."""
    height = max(im.height for im in images)
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def grid_of_panels(images: list[Image.Image], columns: int, gap: int = GAP) -> Image.Image:
    """Panels in rows of `columns`, left to right then top to bottom."""
    rows = [side_by_side(images[i : i + columns], gap) for i in range(0, len(images), columns)]
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height + gap
    return canvas


def with_title(image: Image.Image, text: str, size: int = 17) -> Image.Image:
    """A picture with a bold-ish title band above it."""
    band = size + 14
    canvas = Image.new("RGB", (image.width, image.height + band), "white")
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), _fit_text(text, image.width - 12, size), fill="black", font=_font(size), stroke_width=0)
    return canvas


# --- per-layer counts -------------------------------------------------------------------------------------
def plot_layer_counts(report, sample: int = 0, *, title: str | None = None, ax=None):
    """Bar chart of the visual tokens each decoder layer holds for one sample of `handle.report()`.

    report: a `vtc.Report`, or a mapping label -> Report to compare strategies (grouped bars). A dashed line
    marks the visual tokens of the unpatched model. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    reports = dict(report) if isinstance(report, Mapping) else {report.strategy: report}
    if ax is None:
        n_layers = max(len(r.samples[sample].visual_per_layer) for r in reports.values())
        height = 3.4 + 0.25 * ((len(reports) + 2) // 2)
        fig, ax = plt.subplots(figsize=(min(12.0, 5.0 + 0.25 * n_layers * len(reports) ** 0.5), height), dpi=100)
    else:
        fig = ax.figure
    width = 0.8 / len(reports)
    colours = plt.get_cmap("tab10")
    visual_in = 0
    for k, (label, rep) in enumerate(reports.items()):
        s = rep.samples[sample]
        visual_in = max(visual_in, s.visual_in)
        layers = range(len(s.visual_per_layer))
        offsets = [x - 0.4 + width * (k + 0.5) for x in layers]
        bars = ax.bar(
            offsets,
            s.visual_per_layer,
            width=width,
            color=colours(k % 10),
            label=f"{label if len(reports) > 1 else 'visual tokens'}: LLM FLOPs {s.flops_ratio:.0%} of unpatched",
        )
        if len(reports) == 1 and len(s.visual_per_layer) <= 32:
            ax.bar_label(bars, fontsize=9, padding=2)
    ax.axhline(visual_in, color="black", linestyle="--", linewidth=1, label=f"unpatched: {visual_in} visual tokens")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens")
    n_layers = max(len(r.samples[sample].visual_per_layer) for r in reports.values())
    ax.set_xticks(range(n_layers))
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_ylim(0, visual_in * 1.12 + 1)
    if title is None:
        title = "Visual tokens per decoder layer" + (f" (sample {sample})" if sample else "")
        if len(reports) == 1:
            title += f"\n{next(iter(reports))}"
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(2, len(reports) + 1), fontsize=9, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


# --- video ------------------------------------------------------------------------------------------------
def split_per_frame(kept, n_frames: int, tokens_per_frame: int) -> list[list[int]]:
    """Indices into the concatenated frames' tokens (as `handle.last_kept()[0]`) -> per-frame local indices."""
    out: list[list[int]] = [[] for _ in range(n_frames)]
    for i in sorted(_as_index_set(kept)):
        frame, local = divmod(i, tokens_per_frame)
        if frame >= n_frames:
            raise ValueError(f"index {i} lies beyond {n_frames} frames of {tokens_per_frame} tokens")
        out[frame].append(local)
    return out


def kept_per_unit(layout, kept) -> list[list[int]]:
    """One sample's kept flat visual-token indices (`handle.last_kept()[0]`, batch of one) -> per unit of `layout`
    (`handle.adapter.last_layout`: frames, Qwen temporal patches, crops, images), indices into the unit's grid."""
    kept = _as_index_set(kept)
    return [[i for i, t in enumerate(layout.unit_tokens(u).tolist()) if t in kept] for u in range(len(layout.counts))]


def frame_strip(
    frames: Sequence[Image.Image],
    kept,
    grid: tuple[int, int],
    *,
    budgets: int | Sequence[int] | None = None,
    size: int = 336,
    display: int = 160,
    columns: int | None = None,
    dim: float = 0.75,
    title: str | None = None,
    crop: bool = False,
) -> Image.Image:
    """Frames left to right (rows of `columns`), each with its kept tokens outlined and its budget.

    Each frame keeps its aspect ratio (resized to a long side of `size` pixels, shown at `display`); its token
    grid spans the whole frame, as video processors resize frames (OneVision, Qwen2-VL) rather than crop them.
    crop=True: the grid spans the frame's centre square, framed (LLaVA-1.5's processor: shortest edge resized,
    centre crop), for frames fed to an image model.

    kept: per frame, indices into that frame's grid; or one flat index list over the frames' tokens
        concatenated (`handle.last_kept()[0]` for frames passed as the images of one prompt).
    budgets: the tokens each frame may keep (one int for all, or one per frame), shown with the count.
    Each frame panel's long side is `display` pixels: landscape (or square) frames in `columns` columns make a
    picture columns * display + (columns - 1) * GAP wide."""
    n = len(frames)
    if n == 0:
        raise ValueError("frame_strip needs at least one frame")
    rows, cols = grid
    per_frame = rows * cols
    if isinstance(kept, torch.Tensor) or (len(kept) > 0 and not isinstance(kept[0], (Sequence, torch.Tensor))):
        kept_frames = split_per_frame(kept, n, per_frame)
    else:
        if len(kept) != n:
            raise ValueError(f"kept lists {len(kept)} frames for {n} frames")
        kept_frames = [sorted(_as_index_set(k)) for k in kept]
    if budgets is None or isinstance(budgets, int):
        budgets = [budgets] * n
    if len(budgets) != n:
        raise ValueError(f"budgets lists {len(budgets)} values for {n} frames")
    panels = []
    for f, (frame, k, b) in enumerate(zip(frames, kept_frames, budgets)):
        caption = f"frame {f}: kept {len(k)}" + ("" if b is None else f" / budget {b}")
        view = frame_view(frame, size)
        parts = [Partition(tuple(grid), centre_square(view) if crop else (0.0, 0.0, 1.0, 1.0))]
        panel = overlay_tokens(view, k, parts, dim=dim, title=caption, display=display, legend=False, caption_size=13)
        panels.append(_with_budget_bar(panel, len(k), b, per_frame))
    columns = n if columns is None else max(1, min(columns, n))
    strip = grid_of_panels(panels, columns)
    total = sum(len(k) for k in kept_frames)
    items = _legend_items(total, n * per_frame - total, 0, 0, False) + [
        ("gauge", "kept share of the frame, | = budget")
    ]
    legend = _draw_legend(strip.width, items)
    strip = _stack(strip, legend)
    if title is None:
        title = f"{n} frames x {per_frame} tokens: kept {total}/{n * per_frame} ({total / (n * per_frame):.0%})"
    return with_title(strip, title)


def _with_budget_bar(panel: Image.Image, kept: int, budget: int | None, total: int, height: int = 8) -> Image.Image:
    """A thin gauge under a frame: the kept share filled, the budget marked with a tick."""
    canvas = Image.new("RGB", (panel.width, panel.height + height + 4), "white")
    canvas.paste(panel, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y0, y1, w = panel.height + 2, panel.height + 1 + height, panel.width - 1
    draw.rectangle([0, y0, w, y1], fill=(215, 215, 215))
    if kept:
        draw.rectangle([0, y0, round(w * kept / total), y1], fill=(230, 180, 0))
    if budget is not None:
        x = round(w * budget / total)
        draw.rectangle([max(0, x - 1), y0 - 2, min(w, x + 1), y1 + 2], fill="black")
    return canvas


# --- files ------------------------------------------------------------------------------------------------
def save(picture, path: str | Path, dpi: int = 110) -> Path:
    """Write a PIL image or a matplotlib figure as PNG (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, Image.Image):
        picture.save(path)
    else:
        picture.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
