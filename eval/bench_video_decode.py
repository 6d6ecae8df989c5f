"""Frames per second decoded by `vtc.video.load_video` with each installed backend (decord, PyAV).

    python eval/bench_video_decode.py [--frames 240] [--size 224] [--repeats 3]

Writes a test clip (H.264, `--frames` frames of `--size` px, 24 fps, made with PyAV) to a temporary folder, then
decodes it whole and at 8 frames spread over it, `--repeats` times per backend; prints the median frames/s (the
8-frame rate counts the 8 frames returned, seeking included). Also decodes assets/shapes.mp4 (16 frames, 224 px).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vtc.video import load_video  # noqa: E402


def write_clip(path: Path, frames: int, size: int) -> None:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            frame = Image.fromarray(np.roll(base, 2 * t, axis=1))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def rate(path: Path, backend: str, repeats: int, **sampling) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        clip = load_video(path, backend=backend, **sampling)
        rates.append(len(clip) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers.utils import is_av_available, is_decord_available

    backends = [b for b, ok in (("decord", is_decord_available()), ("pyav", is_av_available())) if ok]
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_clip(clip, args.frames, args.size)
        print(f"{'clip':<28} {'backend':<7} {'all frames/s':>12} {'8 frames/s':>10}")
        for name, path in (
            (f"{args.frames} x {args.size} px H.264", clip),
            ("assets/shapes.mp4", ROOT / "assets" / "shapes.mp4"),
        ):
            for backend in backends:
                every = rate(path, backend, args.repeats)
                eight = rate(path, backend, args.repeats, num_frames=8)
                print(f"{name:<28} {backend:<7} {every:>12.0f} {eight:>10.0f}")


if __name__ == "__main__":
    main()
