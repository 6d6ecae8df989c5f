"""Regenerate this task's clips and questions: `python eval/lmms_tasks/vtc_video_qa/make_data.py [--n 6]`.

Each clip (`videos/NNN.mp4`, H.264, 8 frames, 112 x 112, 4 frames/s, encoded with PyAV) shows one object of
`vtc.data`'s shapes and colours sliding across a textured background, left to right or right to left. One
question per clip, about its colour, its shape or the direction it moves, with the answer known from how the clip
was drawn; `video_qa.jsonl` holds them. Deterministic: the same n gives the same questions and frames.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vtc import data

HERE = Path(__file__).resolve().parent
FRAMES, SIZE, FPS = 8, 112, 4
KINDS = ("colour", "shape", "direction")
QUESTIONS = {
    "colour": "what colour is the moving object ?",
    "shape": "what shape is the moving object ?",
    "direction": "which way does the object move , left or right ?",
}
CHOICES = {"colour": list(data.COLOURS), "shape": list(data.SHAPES), "direction": ["left", "right"]}


def draw_clip(rng: np.random.Generator) -> tuple[list[Image.Image], dict]:
    """Frames of one object sliding horizontally, and what the object is (shape, colour, direction)."""
    obj = {
        "shape": data.SHAPES[int(rng.integers(len(data.SHAPES)))],
        "colour": list(data.COLOURS)[int(rng.integers(len(data.COLOURS)))],
        "size": "large",
        "y": int(rng.integers(36, SIZE - 36)),
    }
    direction = "right" if rng.random() < 0.5 else "left"
    background = data._background(rng)[:SIZE, :SIZE]
    xs = np.linspace(24, SIZE - 24, FRAMES).round().astype(int)
    frames = []
    for x in xs if direction == "right" else xs[::-1]:
        frame = Image.fromarray(background.copy())
        data._draw(ImageDraw.Draw(frame), dict(obj, x=int(x)), data.COLOURS[obj["colour"]])
        frames.append(frame)
    return frames, dict(obj, direction=direction)


def write_mp4(frames: list[Image.Image], path: Path) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6, help="clips (one question each) to write (default 6)")
    args = parser.parse_args()
    videos = HERE / "videos"
    videos.mkdir(exist_ok=True)
    for old in videos.glob("*.mp4"):
        old.unlink()
    rng = np.random.default_rng(data.HELDOUT_SEED)
    lines = []
    for i in range(args.n):
        frames, obj = draw_clip(rng)
        name = f"videos/{i:03d}.mp4"
        write_mp4(frames, HERE / name)
        kind = KINDS[i % len(KINDS)]
        record = {"id": i, "video": name, "question": QUESTIONS[kind], "answer": obj[kind], "kind": kind}
        lines.append(json.dumps(dict(record, choices=CHOICES[kind])))
    (HERE / "video_qa.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} clips and questions to {HERE}")


if __name__ == "__main__":
    main()
