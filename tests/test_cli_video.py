"""`vtc demo --video`: the per-frame table and the frame strip, on a video-native tiny model and on the default."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

import vtc
from vtc import cli
from vtc.testing import load_tiny_model
from vtc.video import load_video

CLIP = Path(__file__).resolve().parents[1] / "assets" / "shapes.mp4"


def _rows(text: str) -> dict[str, list[str]]:
    """strategy -> the cells of its table row (name, visual tokens, ms, ratio, FLOPs, per-frame cells..., answer)."""
    rows = {}
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("unpatched", "quota", "downsample", "fastv"):
            rows[words[0]] = words[: words.index("answer")]
    return rows


def test_demo_video_table_shows_each_strategys_per_frame_budgets(tmp_path, capsys):
    out = tmp_path / "strip.png"
    argv = ["demo", "--video", str(CLIP), "--model", "vtc-tiny-onevision", "--frames", "4", "--out", str(out)]
    assert cli.main([*argv, "--strategy", "quota", "downsample", "fastv", "--keep", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "4/16 frames decoded by" in printed and "frame times (s): 0.00, 0.50, 1.00, 1.50" in printed
    rows = _rows(printed)

    # the oracle: QuoTA run directly on the processor's own video inputs of the same decoded frames
    model, processor = load_tiny_model("vtc-tiny-onevision")
    inputs, _ = cli._video_inputs(processor, load_video(CLIP, max_frames=4), cli.DEFAULT_VIDEO_QUESTION)
    with vtc.patched(model, "quota", keep=0.5, processor=processor) as handle, torch.no_grad():
        model(**inputs)
        plan = sorted(handle.strategy.last_plan, key=lambda p: p["unit"])
        kept = handle.report().samples[0].visual_per_layer[-1]
    assert rows["quota"][5:] == [f"{p['kept']}/{p['budget']}" for p in plan]
    assert rows["quota"][1] == f"{kept}/16"
    assert rows["downsample"][5:] == ["2/2"] * 4 and rows["downsample"][1] == "8/16"  # 4 tokens per frame, keep 0.5
    assert sum(int(c) for c in rows["fastv"][5:]) == 8 and rows["fastv"][1] == "8/16"  # no per-frame budget
    with Image.open(out) as strip:
        assert strip.width > 4 * 100 and strip.height > 3 * 100  # three strips of four frames


def test_demo_video_on_an_image_model_uses_frames_as_images(tmp_path, capsys):
    out = tmp_path / "strip.png"
    argv = ["demo", "--video", str(CLIP), "--frames", "2", "--strategy", "downsample", "--random-model"]
    argv += ["--out", str(out)]
    assert cli.main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    per_frame = rows["downsample"][5:]
    assert len(per_frame) == 2 and len(set(per_frame)) == 1  # one uniform budget per frame (image)
    kept, total = rows["downsample"][1].split("/")
    assert sum(int(c.split("/")[0]) for c in per_frame) == int(kept) and int(total) % 2 == 0
    assert out.is_file()


def _wide_clip(path: Path) -> Path:
    """Four 160 x 80 frames: a red band on the left, a blue band on the right, grey between (a square centre crop
    would show grey only)."""
    import av
    import numpy as np

    pixels = np.full((80, 160, 3), 128, dtype=np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, -30:] = (0, 0, 255)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = 160, 80, "yuv420p"
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _colour_pixels(picture: Image.Image) -> tuple[int, int]:
    """(red, blue) pixels of the picture, dimmed ones included."""
    import numpy as np

    x = np.asarray(picture.convert("RGB")).astype(int)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return int(((r > 50) & (g < 30) & (b < 30)).sum()), int(((b > 50) & (r < 30) & (g < 30)).sum())


def test_frame_strips_keep_the_aspect_ratio(tmp_path, capsys):
    """Non-square frames are shown whole (both side bands visible), not cropped to their centre square; on a video
    model the token grid spans the whole frame, on an image model (LLaVA-1.5 centre-crops) its centre square."""
    import numpy as np

    from vtc import viz

    clip = _wide_clip(tmp_path / "wide.mp4")
    for extra in (["--model", "vtc-tiny-onevision"], ["--random-model"]):
        out = tmp_path / f"strip{len(extra)}.png"
        argv = ["demo", "--video", str(clip), "--frames", "2", "--strategy", "downsample", "--out", str(out), *extra]
        assert cli.main(argv) == 0
        with Image.open(out) as strip:
            red, blue = _colour_pixels(strip)
            # each 160 x 80 frame is a 160 x 80 panel: its 30 px bands are about 30 x 80 px each
            assert red > 2 * 20 * 60 and blue > 2 * 20 * 60, (extra, red, blue)
            assert strip.height < 300  # one strip: a title, 80 px panels with captions and gauges, the legend
            framed = (np.asarray(strip.convert("RGB")) == viz.CROP_COLOUR).all(-1).sum()
            assert (framed > 0) == ("--random-model" in extra)  # the image model's centre square is framed
    capsys.readouterr()
