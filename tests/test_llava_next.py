"""DESIGN.md section 4 invariants on the LLaVA-NeXT and LLaVA-OneVision adapters (anyres crops, videos)."""

import functools

import pytest
import torch

import vtc
from vtc.adapters.llava_next import kept_by_unit
from vtc.testing import make_image
from vtc.testing.llava_next import (
    make_video,
    make_wide_image,
    next_inputs,
    onevision_video_inputs,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)

from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_cached_generate_equals_recompute,
    assert_keep_one_is_identity,
    assert_text_only_passes_through,
    assert_unit_budgets_and_oracle,
    assert_unpatch_restores_image_and_video,
    compacted_oracle_logits,
    greedy_recompute,
    lm_input_embeds,
)

VISION_KEYS = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")
QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word.", "Where is it?"]
IMAGES = [[make_wide_image(0)], [make_image(1)], [make_wide_image(2, (64, 96)), make_image(3)]]


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next("llama", seed=0)


@pytest.fixture(scope="module")
def ov_model():
    return tiny_llava_onevision("qwen2", seed=0)


@pytest.fixture(scope="module")
def next_proc():
    return tiny_llava_next_processor()


@pytest.fixture(scope="module")
def ov_proc():
    return tiny_llava_onevision_processor()


@pytest.fixture(scope="module")
def cases(next_model, ov_model, next_proc, ov_proc):
    """name -> (model, processor, batch). NeXT: a wide, a square and a tall + square pair (crops of
    different shapes, left padding); OneVision: the same images (multi-image sample: no crops), and videos."""
    return {
        "next": (next_model, next_proc, next_inputs(next_proc, QUESTIONS, IMAGES)),
        "ov": (ov_model, ov_proc, next_inputs(ov_proc, QUESTIONS, IMAGES)),
        "ov_video": (
            ov_model,
            ov_proc,
            onevision_video_inputs(
                ov_proc, ["What happens?", "Describe the clip, please."], [make_video(0), make_video(1)]
            ),
        ),
    }


CASE_STRATEGIES = [
    (case, s)
    for case, strategies in [
        ("next", ["none", "vtc_cls", "fopru", "fastv"]),
        ("ov", ["none", "fopru", "fastv"]),
        ("ov_video", ["none", "fopru", "fastv"]),
    ]
    for s in strategies
]
PRE_LLM = [("next", "vtc_cls"), ("next", "fopru"), ("ov", "fopru"), ("ov_video", "fopru")]


def lm_inputs(model, inputs):
    """The inputs_embeds the unpatched model hands its language model, and the visual-token mask (image or
    video placeholders that are not newline tokens: those carry `image_newline` exactly)."""
    embeds, ids = lm_input_embeds(model, inputs), inputs["input_ids"]
    placeholders = ids == model.config.image_token_id
    if getattr(model.config, "video_token_id", None) is not None:
        placeholders |= ids == model.config.video_token_id
    newline = (embeds == model.model.image_newline).all(-1)
    return embeds, placeholders & ~newline


@pytest.mark.parametrize("case,strategy", CASE_STRATEGIES)
def test_keep_one_is_identity(case, strategy, cases):
    model, _, inputs = cases[case]
    assert_keep_one_is_identity(model, inputs, strategy)


@pytest.mark.parametrize("case,strategy", PRE_LLM)
@pytest.mark.parametrize("keep", [0.25, 2])
def test_pre_llm_equals_oracle_and_unit_budgets(case, strategy, keep, cases):
    model, _, inputs = cases[case]

    def unit_size(row):  # every unit (base image, crop, frame) gets its own budget, of its grid's size
        return row["grid"][0] * row["grid"][1]

    assert_unit_budgets_and_oracle(model, inputs, lm_inputs(model, inputs), strategy, keep, unit_size)


def test_units_partition_the_crops(cases):
    """Base image + one unit per crop; crop units are the sub-rectangles of the unpadded stitched grid."""
    model, _, inputs = cases["next"]
    with torch.no_grad(), vtc.patched(model, "none") as handle:
        model(**inputs)
        layout = handle.adapter.last_layout
    units, images = layout.extras["units"], layout.extras["images"]
    assert [u["image"] for u in units if u["role"] == "base"] == [0, 1, 2, 3]
    assert [(im["crops"], im["grid"]) for im in images] == [
        ((2, 2), (4, 6)),
        ((2, 2), (6, 6)),
        ((2, 2), (6, 4)),
        ((2, 2), (6, 6)),
    ]
    assert layout.sample_of_image == [u["sample"] for u in units] == [0] * 5 + [1] * 5 + [2] * 10
    wide = [u for u in units if u["image"] == 0]
    assert [(u["role"], u["crop"], u["box"], u["grid"]) for u in wide] == [
        ("base", None, None, (3, 3)),
        ("crop", (0, 0), (0, 0, 2, 3), (2, 3)),
        ("crop", (0, 1), (0, 3, 2, 6), (2, 3)),
        ("crop", (1, 0), (2, 0, 4, 3), (2, 3)),
        ("crop", (1, 1), (2, 3, 4, 6), (2, 3)),
    ]
    tall = [u for u in units if u["image"] == 2 and u["role"] == "crop"]
    assert [u["box"] for u in tall] == [(0, 0, 3, 2), (0, 2, 3, 4), (3, 0, 6, 2), (3, 2, 6, 4)]
    # sequence order: base (9 tokens), then the 4 x 6 grid row by row (newlines left out)
    members = [layout.unit_tokens(u).tolist() for u in range(5)]
    assert members[0] == list(range(9))
    assert members[1] == [9, 10, 11, 15, 16, 17] and members[2] == [12, 13, 14, 18, 19, 20]
    assert sorted(sum(members, [])) == list(range(33))


def test_cls_probe_follows_crops_and_unpadding(next_model, next_proc):
    """The [CLS] scores a strategy sees for a crop unit are the tower's own attention rows of that crop,
    cut to the unpadded rectangle (oracle: eager attention weights of the unpatched vision tower)."""
    model = next_model
    inputs = next_inputs(next_proc, ["What is it?"], [[make_wide_image(4)]])
    seen = {}

    class Echo(vtc.Strategy):
        name = "echo_cls"

        def vision_probes(self, num_layers, feature_layer):
            return {"cls": [feature_layer]}

        def select(self, visual):
            for i, unit in enumerate(visual.image_index.tolist()):
                seen[unit] = visual.cls_attention[2][i]
            return super().select(visual)

    with torch.no_grad():
        pixels = inputs["pixel_values"][0]  # base + 4 crops
        tower = model.model.vision_tower
        tower.config._attn_implementation = "eager"  # attention weights for the oracle only
        try:
            attn = tower(pixels, output_attentions=True).attentions[2][:, :, 0, 1:]  # (5, heads, 9)
        finally:
            tower.config._attn_implementation = "sdpa"
        with vtc.patched(model, Echo(keep=1.0)) as handle:
            model(**inputs)
            units = handle.adapter.last_layout.extras["units"]
    grid = attn.view(5, attn.shape[1], 3, 3)
    assert torch.allclose(seen[0], grid[0].flatten(1), atol=1e-6)
    pad = (6 - 4) // 2  # 6 padded rows, 4 kept
    for unit in units[1:]:
        (i, j), (r0, c0, r1, c1) = unit["crop"], unit["box"]
        rows = torch.arange(r0, r1) + pad - 3 * i
        cols = torch.arange(c0, c1) - 3 * j
        expected = grid[unit["patch"]][:, rows][:, :, cols].flatten(1)
        assert torch.allclose(seen[unit["unit"]], expected, atol=1e-6)


@pytest.mark.parametrize(
    "case,strategy", [("next", "vtc_cls"), ("next", "fastv"), ("ov", "fopru"), ("ov_video", "fastv")]
)
def test_generate_with_cache_equals_recompute(case, strategy, cases):
    model, _, inputs = cases[case]
    recompute = functools.partial(greedy_recompute, vision_keys=VISION_KEYS)
    assert_cached_generate_equals_recompute(model, inputs, strategy, 4, recompute, keep=0.25)


@pytest.mark.parametrize("case,strategy", [("next", "vtc_cls"), ("ov", "fastv")])
def test_batch_equals_each_sample_alone(case, strategy, cases):
    model, processor, inputs = cases[case]
    alone = {b: next_inputs(processor, [QUESTIONS[b]], [IMAGES[b]]) for b in (0, 2)}  # unpadded crops; two images
    assert_batch_equals_each_sample_alone(model, inputs, alone, strategy, keep=0.25, stop_at_eos=True)


def test_onevision_video_frames_are_units(cases):
    model, _, inputs = cases["ov_video"]
    with torch.no_grad(), vtc.patched(model, "fopru", keep=1) as handle:
        model(**inputs)
        report = handle.report()
        units = kept_by_unit(handle)
        layout = handle.adapter.last_layout
    assert layout.counts == [4] * 6 and layout.grids == [(2, 2)] * 6
    assert [(r["video"], r["frame"], r["role"], len(r["kept"])) for r in units[1]] == [
        (1, f, "frame", 1) for f in range(3)
    ]
    assert [s.visual_in for s in report.samples] == [12, 12]
    assert [s.visual_after_pre_llm for s in report.samples] == [3, 3]
    assert report.samples[1].images == [3, 4, 5]


def test_onevision_downsampled_grid(ov_model):
    """anyres_max_1: the stitched grid is downsampled (bilinear); units stay rectangles; oracle holds."""
    model = ov_model
    processor = tiny_llava_onevision_processor("anyres_max_1")
    inputs = next_inputs(processor, ["What is it?", "Where?"], [[make_wide_image(5)], [make_image(6)]])
    model.config.vision_aspect_ratio = model.model.config.vision_aspect_ratio = "anyres_max_1"
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
            full = lm_inputs(model, inputs)
            with vtc.patched(model, "fopru", keep=1.0):
                assert (model(**inputs).logits - ref)[inputs["attention_mask"].bool()].abs().max() <= 1e-5
            with vtc.patched(model, "fopru", keep=0.5) as handle:
                out = model(**inputs).logits
                kept = handle.last_kept()
                layout = handle.adapter.last_layout
    finally:
        model.config.vision_aspect_ratio = model.model.config.vision_aspect_ratio = "anyres_max_9"
    assert layout.extras["images"][0]["downsampled"]
    crops = [u for u in layout.extras["units"] if u["role"] == "crop" and u["image"] == 0]
    assert sum(u["grid"][0] * u["grid"][1] for u in crops) == 6  # the 4 x 6 grid became 2 x 3
    for b in range(2):
        oracle = compacted_oracle_logits(model, inputs, kept, b, full)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


def test_unpatch_restores_exactly(cases):
    model, _, inputs = cases["ov"]
    video = cases["ov_video"][2]

    def installed(m):  # what the patch puts on the instance
        return "pack_image_features" in vars(m.model)

    assert_unpatch_restores_image_and_video(model, inputs, video, "fopru", installed, keep=0.25)


def test_text_only_passes_through(cases):
    model, processor, _ = cases["next"]
    inputs = next_inputs(processor, ["Where is the small object?", "How many?"])
    assert_text_only_passes_through(model, inputs, "vtc_cls")


def test_bad_input_fails_loud(cases):
    next_model, _, next_batch = cases["next"]
    ov_model, _, video = cases["ov_video"]
    with vtc.patched(next_model, "fastv", keep=0.5), pytest.raises(ValueError, match="has no video path"):
        next_model(**next_batch, pixel_values_videos=video["pixel_values_videos"])
    with pytest.raises(ValueError, match=r"no \[CLS\] token.*fopru"):
        vtc.patch(ov_model, "vtc_cls", keep=0.25)
    assert "forward" not in vars(ov_model.model.language_model)  # left unpatched
    assert "pack_image_features" not in vars(ov_model.model)
    assert {"LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"} <= set(
        vtc.supported_models()
    )
