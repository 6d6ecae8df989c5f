"""vtc.viz: overlay pixels, outlined cells, merged groups, crops, per-layer bar heights, frame strip size."""

from __future__ import annotations

import random

import matplotlib
import pytest
import torch
from PIL import Image

import vtc
from vtc import viz

matplotlib.use("Agg")


def grey(size: int = 64, value: int = 128) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def centre(picture: Image.Image, box) -> tuple[int, int, int]:
    x0, y0, x1, y1 = box
    return picture.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))


def outlined(picture: Image.Image, boxes) -> list[int]:
    """Tokens whose cell starts with the kept-outline colour at its top-left corner."""
    return [i for i, box in enumerate(boxes) if picture.getpixel(box[:2]) == viz.KEPT_COLOUR]


def test_kept_cell_is_brighter_than_the_same_cell_dimmed():
    boxes = viz.token_cells((4, 4), (128, 128))
    kept = viz.overlay_kept(grey(), [5], (4, 4), size=64, display=128)
    dropped = viz.overlay_kept(grey(), [6], (4, 4), size=64, display=128)
    assert sum(centre(kept, boxes[5])) > 2 * sum(centre(dropped, boxes[5]))
    assert centre(kept, boxes[5]) == (128, 128, 128)  # kept cells keep their pixels
    assert centre(dropped, boxes[5]) == centre(kept, boxes[6])  # every dropped cell is dimmed alike


@pytest.mark.parametrize("grid", [(6, 6), (24, 24), (3, 5)])
def test_number_of_outlined_cells_equals_len_kept(grid):
    n = grid[0] * grid[1]
    kept = sorted(random.Random(n).sample(range(n), k=max(1, n // 4)))
    picture = viz.overlay_kept(grey(), torch.tensor(kept), grid, size=64, display=240)
    assert outlined(picture, viz.token_cells(grid, (240, 240))) == kept


def test_overlay_keeps_the_demo_signature():
    """`vtc demo` draws the input panel as `overlay_kept(image, [], (1, 1), size=..., dim=0.0, title=...)`."""
    picture = viz.overlay_kept(grey(84), [], (1, 1), size=84, dim=0.0, title="input (as the model sees it)")
    assert picture.size == (256, 256 + viz.CAPTION_HEIGHT)  # no legend under a plain view
    assert picture.getpixel((128, viz.CAPTION_HEIGHT + 128)) == (128, 128, 128)
    assert viz.side_by_side([picture, picture]).size == (2 * 256 + viz.GAP, 256 + viz.CAPTION_HEIGHT)
    big = viz.overlay_kept(grey(336), [0], (24, 24), size=336)
    assert big.width == 336  # the panel is at least the vision tower's input size


def test_anyres_partitions_draw_crop_borders_and_one_outline_per_kept_token():
    parts = viz.anyres_partitions((4, 4), (4, 4), (2, 2))  # base view + 2x2 crops, 80 tokens
    assert [p.n_tokens for p in parts] == [16] * 5
    kept = [0, 3, 15, 16, 21, 40, 63, 79]
    picture = viz.overlay_tokens(grey(128), kept, parts, display=200)
    boxes = viz.token_cells(parts, (200, 200))
    assert outlined(picture, boxes) == kept
    assert picture.width == 2 * 200 + viz.GAP  # base view and crops side by side
    for x in (99, 100):  # the borders of crops 3 and 4 where they meet, in the crops' panel
        assert picture.getpixel((200 + viz.GAP + x, viz.CAPTION_HEIGHT + 150)) == viz.CROP_COLOUR
    assert picture.getpixel((99, viz.CAPTION_HEIGHT + 150)) != viz.CROP_COLOUR  # the base view has no crops
    with pytest.raises(ValueError, match="outside"):
        viz.overlay_tokens(grey(), [80], parts)


def test_merged_groups_are_coloured_instead_of_dimmed():
    boxes = viz.token_cells((4, 4), (128, 128))
    groups = {0: 7, 1: 7, 4: 7, 10: 3, 11: 3}  # token -> group; tokens 0 and 10 are the kept representatives
    picture = viz.overlay_kept(grey(), [0, 10], (4, 4), size=64, display=128, groups=groups)
    first, second = viz.GROUP_COLOURS[0], viz.GROUP_COLOURS[1]  # in order of first appearance
    for token, colour in [(1, first), (4, first), (11, second)]:
        pixel = centre(picture, boxes[token])
        assert all(abs(p - (0.45 * 128 + 0.55 * c)) <= 3 for p, c in zip(pixel, colour)), (token, pixel)
    assert sum(centre(picture, boxes[2])) < 150  # not in a group: dimmed
    assert outlined(picture, boxes) == [0, 10]
    as_list = viz.overlay_kept(
        grey(), [0, 10], (4, 4), size=64, display=128, groups=[7, 7, -1, -1, 7] + [-1] * 5 + [3, 3] + [-1] * 4
    )
    assert as_list.tobytes() == picture.tobytes()


@pytest.fixture(scope="module")
def reports(llava, single):
    out = {}
    for name, keep in [("fastv", 0.5), ("vtc_cls", 0.25)]:
        with vtc.patched(llava, name, keep=keep) as handle, torch.no_grad():
            llava(**single)
            out[name] = handle.report()
    return out


def test_bar_heights_equal_the_report_counts(reports):
    import matplotlib.pyplot as plt

    report = reports["fastv"]
    fig = viz.plot_layer_counts(report)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == report.samples[0].visual_per_layer
    assert heights[0] > heights[-1]  # fastv prunes inside the LLM
    assert fig.axes[0].lines[0].get_ydata()[0] == report.samples[0].visual_in  # the unpatched line
    plt.close(fig)

    fig = viz.plot_layer_counts(reports)
    containers = fig.axes[0].containers
    assert len(containers) == 2
    for container, (name, rep) in zip(containers, reports.items()):
        assert [bar.get_height() for bar in container] == rep.samples[0].visual_per_layer, name
    plt.close(fig)


def test_frame_strip_size_budgets_and_kept(reports):
    grid, display, n = (6, 6), 100, 5
    frames = [grey(84, 60 + 30 * i) for i in range(n)]
    per_frame = [sorted(random.Random(i).sample(range(36), k=9)) for i in range(n)]
    flat = torch.tensor([f * 36 + i for f, k in enumerate(per_frame) for i in k])
    strip = viz.frame_strip(frames, flat, grid, budgets=9, size=84, display=display)
    assert strip.width == n * display + (n - 1) * viz.GAP
    assert display + viz.CAPTION_HEIGHT < strip.height < 2 * display
    assert viz.frame_strip(frames, per_frame, grid, budgets=[9] * n, size=84, display=display).tobytes() == (
        strip.tobytes()
    )
    wrapped = viz.frame_strip(frames, flat, grid, budgets=9, size=84, display=display, columns=3)
    assert wrapped.width == 3 * display + 2 * viz.GAP
    assert wrapped.height > strip.height + display
    assert viz.split_per_frame(flat, n, 36) == per_frame
    with pytest.raises(ValueError, match="budgets"):
        viz.frame_strip(frames, flat, grid, budgets=[9, 9], size=84)


def test_save_writes_png_for_images_and_figures(tmp_path, reports):
    image_path = viz.save(viz.overlay_kept(grey(), [1], (2, 2), size=64), tmp_path / "a" / "overlay.png")
    figure_path = viz.save(viz.plot_layer_counts(reports["vtc_cls"]), tmp_path / "layers.png")
    for path in (image_path, figure_path):
        with Image.open(path) as picture:
            assert picture.format == "PNG"


def test_partitions_from_llava_next_units():
    """Units as `kept_by_unit` describes them: a base image, then crops that tile the stitched grid."""
    units = [
        {"role": "base", "grid": (4, 4), "box": None, "crop": None, "kept": torch.tensor([0, 5])},
        {"role": "crop", "grid": (4, 4), "box": (0, 0, 4, 4), "crop": (0, 0), "kept": torch.tensor([1])},
        {"role": "crop", "grid": (4, 2), "box": (0, 4, 4, 6), "crop": (0, 1), "kept": torch.tensor([7])},
    ]
    parts, kept = viz.partitions_from_units(units, stitched_grid=(4, 6))
    assert [p.grid for p in parts] == [(4, 4), (4, 4), (4, 2)]
    assert parts[2].box == (4 / 6, 0.0, 1.0, 1.0)
    assert kept == [0, 5, 17, 39]
    picture = viz.overlay_tokens(grey(96).resize((144, 96)), kept, parts, display=240)
    boxes = viz.token_cells(parts, (240, 160))
    assert outlined(picture, boxes) == kept
