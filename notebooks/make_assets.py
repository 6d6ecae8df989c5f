"""Draw the notebooks' assets (our own pictures, no third-party media):

    assets/scene.png        a 336x336 still: a table top with a few objects (quick start, gallery, slider)
    assets/shapes.mp4       16 frames, 224x224, 8 fps: a red ball rolls left to right past a blue box (H.264)
    assets/shapes.gif       the same clip at 112x112 for machines without decord or PyAV

Run `python notebooks/make_assets.py` from the repository root (needs numpy, Pillow and, for the MP4, PyAV).
Deterministic: the same files every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ASSETS = Path(__file__).resolve().parents[1] / "assets"
VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS = 16, 224, 8


def draw_scene(size: int = 336) -> Image.Image:
    """A wall, a wooden table top, a cup, an apple, a book and a small key: objects of several sizes."""
    rng = np.random.default_rng(7)
    y = np.linspace(0, 1, size)[:, None, None]
    wall = np.array([196, 208, 222]) * (1 - 0.25 * y) + rng.normal(0, 1.2, (size, size, 3))
    img = Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = size / 336
    table_top = int(200 * s)
    for i in range(0, size, max(1, int(6 * s))):  # wood grain
        shade = 140 + int(20 * np.sin(i / (9 * s)))
        d.rectangle([0, table_top + i // 3, size, table_top + i // 3 + int(3 * s)], fill=(shade, 96, 56))
    d.rectangle([0, table_top - int(4 * s), size, table_top], fill=(110, 70, 40))
    d.rectangle([int(20 * s), int(30 * s), int(120 * s), int(110 * s)], fill=(250, 250, 245), outline=(90, 90, 90))
    d.polygon(
        [(int(30 * s), int(100 * s)), (int(70 * s), int(50 * s)), (int(110 * s), int(100 * s))], fill=(70, 140, 80)
    )
    d.ellipse([int(80 * s), int(40 * s), int(100 * s), int(60 * s)], fill=(250, 200, 40))
    d.rectangle([int(40 * s), int(165 * s), int(100 * s), int(235 * s)], fill=(40, 90, 200))  # cup
    d.arc(
        [int(92 * s), int(180 * s), int(122 * s), int(215 * s)], -90, 90, fill=(40, 90, 200), width=max(2, int(7 * s))
    )
    d.ellipse([int(150 * s), int(190 * s), int(200 * s), int(240 * s)], fill=(210, 30, 40))  # apple
    d.line([int(175 * s), int(192 * s), int(180 * s), int(178 * s)], fill=(80, 50, 20), width=max(1, int(4 * s)))
    d.polygon(
        [
            (int(225 * s), int(235 * s)),
            (int(315 * s), int(225 * s)),
            (int(320 * s), int(250 * s)),
            (int(230 * s), int(262 * s)),
        ],
        fill=(120, 40, 140),
    )  # book
    d.ellipse(
        [int(262 * s), int(285 * s), int(276 * s), int(299 * s)], outline=(230, 190, 30), width=max(1, int(3 * s))
    )
    d.line(
        [int(276 * s), int(292 * s), int(300 * s), int(292 * s)], fill=(230, 190, 30), width=max(1, int(3 * s))
    )  # key
    return img


def draw_frames(n: int = VIDEO_FRAMES, size: int = VIDEO_SIZE) -> list[Image.Image]:
    """A red ball rolls left to right along the floor past a static blue box; a yellow star blinks."""
    y = np.linspace(0, 1, size)[:, None, None] * np.ones((1, size, 1))
    background = np.clip(np.array([150, 180, 120]) * (0.8 + 0.2 * y), 0, 255).astype(np.uint8)
    frames = []
    for t in range(n):
        img = Image.fromarray(background.copy())
        d = ImageDraw.Draw(img)
        d.rectangle([0, int(size * 0.72), size, size], fill=(120, 110, 100))
        d.rectangle([int(size * 0.55), int(size * 0.45), int(size * 0.78), int(size * 0.72)], fill=(40, 70, 200))
        r = size * 0.08
        x = size * 0.08 + (size * 0.84) * t / max(1, n - 1)
        cy = size * 0.72 - r
        d.ellipse([x - r, cy - r, x + r, cy + r], fill=(220, 30, 30))
        if t % 4 < 2:
            cx, cy2, rr = size * 0.2, size * 0.18, size * 0.06
            pts = [
                (
                    cx + rr * (1 if k % 2 == 0 else 0.45) * np.sin(k * np.pi / 5),
                    cy2 - rr * (1 if k % 2 == 0 else 0.45) * np.cos(k * np.pi / 5),
                )
                for k in range(10)
            ]
            d.polygon(pts, fill=(250, 215, 30))
        frames.append(img)
    return frames


def write_mp4(frames: list[Image.Image], path: Path, fps: int = VIDEO_FPS) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23", "preset": "veryslow"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_gif(frames: list[Image.Image], path: Path, size: int = 112, fps: int = VIDEO_FPS) -> None:
    small = [f.resize((size, size), Image.Resampling.LANCZOS) for f in frames]
    small = [f.quantize(64, method=Image.Quantize.MEDIANCUT) for f in small]
    small[0].save(path, save_all=True, append_images=small[1:], duration=1000 // fps, loop=0, optimize=True)


def main() -> None:
    ASSETS.mkdir(exist_ok=True)
    draw_scene().save(ASSETS / "scene.png", optimize=True)
    frames = draw_frames()
    write_mp4(frames, ASSETS / "shapes.mp4")
    write_gif(frames, ASSETS / "shapes.gif")
    for name in ("scene.png", "shapes.mp4", "shapes.gif"):
        print(f"{ASSETS / name}: {(ASSETS / name).stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
