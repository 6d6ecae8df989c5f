"""Which units of a selection group are frames of one video: shared by the video strategies (quota, evs, vidcom2,
fastvid), which budget or compare frames across a video rather than unit by unit."""

from __future__ import annotations

from .base import VisualTokens

FRAMES = ("video", "sample")


def video_of(layout, unit: int) -> tuple:
    """Which video a unit is a frame of ("video", index), or ("unit", unit) for an image or crop."""
    info = (layout.extras.get("units") or [None] * (unit + 1))[unit] or {}
    if info.get("role") == "frame" and info.get("video") is not None:  # LLaVA-OneVision
        return ("video", info["video"])
    if info.get("kind") == "video":  # Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one unit per temporal patch
        return ("video", info["index"])
    return ("unit", unit)


def video_rows(visual: VisualTokens, frames: str = "video") -> list[tuple[tuple, list[int]]]:
    """The rows of `visual` grouped by video, each group in temporal order: [(key, rows)], key ("video", i) for a
    video's frames, ("unit", u) for an image or crop (a one-frame group). frames="sample" takes every unit of one
    sample in this group (same grid) as the consecutive frames of one video: InternVL receives a video's frames as
    single-tile pictures, so nothing else tells its frames apart from pictures."""
    if frames not in FRAMES:
        raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {frames!r}")
    units = [int(u) for u in visual.image_index.tolist()]
    groups: dict[tuple, list[int]] = {}
    if frames == "sample":
        samples = visual.context["sample"].tolist()
        for row, sample in enumerate(samples):
            groups.setdefault(("sample", int(sample)), []).append(row)
    else:
        layout = visual.context["layout"]
        for row, unit in enumerate(units):
            groups.setdefault(video_of(layout, unit), []).append(row)
    # units are numbered in order of appearance, so a video's rows are in temporal order
    return [(key, sorted(rows, key=lambda r: units[r])) for key, rows in groups.items()]
