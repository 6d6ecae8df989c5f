"""DESIGN.md section 4 invariants on the InternVL adapter (tiles + thumbnail, pixel shuffle, multi-image, video)."""

import pytest
import torch

import vtc
from vtc.adapters.internvl import infer_tile_grid
from vtc.adapters.llava_next import kept_by_unit
from vtc.testing import make_image
from vtc.testing.internvl import (
    TOKENS_PER_TILE,
    internvl_inputs,
    internvl_video_inputs,
    make_video,
    make_wide_image,
    tiny_internvl,
    tiny_internvl_processor,
)

from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_cached_generate_equals_recompute,
    assert_keep_one_is_identity,
    assert_text_only_passes_through,
    assert_unit_budgets_and_oracle,
    assert_unpatch_restores_image_and_video,
    compacted_oracle_logits,
    hook_count,
    instance_attributes,
    lm_input_embeds,
)

QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word.", "Where is it?"]
# a wide picture (1 x 2 tiles + thumbnail), a square one (2 x 2 + thumbnail), a tall + a small square one
IMAGES = [[make_wide_image(0)], [make_image(1)], [make_wide_image(2, (64, 128)), make_image(3, size=48)]]


@pytest.fixture(scope="module")
def model():
    return tiny_internvl("qwen2", seed=0)


@pytest.fixture(scope="module")
def processor():
    return tiny_internvl_processor()


@pytest.fixture(scope="module")
def cases(model, processor):
    """name -> batch: images (left padding, different tile counts, a two-image sample) and videos."""
    return {
        "image": internvl_inputs(processor, QUESTIONS, IMAGES),
        "video": internvl_video_inputs(
            processor, ["What happens?", "Describe the clip, please."], [make_video(0), make_video(1, frames=2)]
        ),
    }


def lm_inputs(model, inputs):
    """The inputs_embeds the unpatched model hands its language model, and the visual-token mask."""
    return lm_input_embeds(model, inputs), inputs["input_ids"] == model.config.image_token_id


@pytest.mark.parametrize(
    "case,strategy",
    [("image", s) for s in ["none", "vtc_cls", "fopru", "fastv", "visionzip", "tome"]]
    + [("video", s) for s in ["none", "fopru", "fastv"]],
)
def test_keep_one_is_identity(case, strategy, model, cases):
    assert_keep_one_is_identity(model, cases[case], strategy)


def test_keep_one_is_identity_llama_and_feature_layer(processor):
    """A Llama decoder, and vision_feature_layer=-2 (features = hidden_states[-2], the probes' feature layer)."""
    model = tiny_internvl("llama", seed=1, vision_feature_layer=-2)
    inputs = internvl_inputs(processor, QUESTIONS[:2], IMAGES[:2])
    handle = vtc.patch(model, "fopru", keep=0.5)
    try:
        assert handle.adapter.feature_layer() == 2 == model.config.vision_config.num_hidden_layers - 2
    finally:
        handle.unpatch()
    assert_keep_one_is_identity(model, inputs, "vtc_cls")
    full = lm_inputs(model, inputs)
    with torch.no_grad(), vtc.patched(model, "vtc_cls", keep=0.25) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
    for b in range(2):
        oracle = compacted_oracle_logits(model, inputs, kept, b, full)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "case,strategy", [("image", "vtc_cls"), ("image", "fopru"), ("image", "random"), ("video", "vtc_cls")]
)
@pytest.mark.parametrize("keep", [0.25, 3])
def test_pre_llm_equals_oracle_and_tile_budgets(case, strategy, keep, model, cases):
    inputs = cases[case]
    # every tile and thumbnail (or frame) gets its own budget of TOKENS_PER_TILE
    assert_unit_budgets_and_oracle(model, inputs, lm_inputs(model, inputs), strategy, keep, lambda row: TOKENS_PER_TILE)


def test_tiles_are_units(model, processor, cases):
    """Crops (row-major, with their box in the stitched token grid) then the thumbnail ("base"), per picture,
    as the processor cut them; a single-tile picture is one "base" unit."""
    inputs = cases["image"]
    with torch.no_grad(), vtc.patched(model, "none") as handle:
        model(**inputs)
        layout = handle.adapter.last_layout
    units, images = layout.extras["units"], layout.extras["images"]
    assert [(im["tiles"], im["crops"], im["grid"]) for im in images] == [
        (3, (1, 2), (4, 8)),
        (5, (2, 2), (8, 8)),
        (3, (2, 1), (8, 4)),
        (1, (0, 0), None),
    ]
    assert layout.counts == [TOKENS_PER_TILE] * 12 and layout.grids == [(4, 4)] * 12
    assert layout.sample_of_image == [u["sample"] for u in units] == [0] * 3 + [1] * 5 + [2] * 4
    assert [(u["image"], u["role"], u["patch"], u["crop"], u["box"]) for u in units if u["image"] in (0, 3)] == [
        (0, "crop", 0, (0, 0), (0, 0, 4, 4)),
        (0, "crop", 1, (0, 1), (0, 4, 4, 8)),
        (0, "base", 2, None, None),
        (3, "base", 0, None, None),
    ]
    square = [u["box"] for u in units if u["image"] == 1 and u["role"] == "crop"]
    assert square == [(0, 0, 4, 4), (0, 4, 4, 8), (4, 0, 8, 4), (4, 4, 8, 8)]
    # units are the tiles in prompt order: unit u is visual tokens [16u, 16u + 16)
    assert [layout.unit_tokens(u).tolist() for u in (0, 11)] == [list(range(16)), list(range(176, 192))]


@pytest.mark.parametrize("size", [(192, 64), (64, 192), (128, 64), (96, 96), (160, 120), (200, 90)])
def test_tile_grid_matches_the_processor(size):
    """The (rows, cols) vtc infers from the tiles is the grid the processor chose (more candidates: 1 x 3 / 3 x 1
    for 3 crops, 1 x 4 / 2 x 2 / 4 x 1 for 4)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    processor = tiny_internvl_processor()
    image = make_image(7, size=max(size)).resize(size)
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    cols, rows = get_optimal_tiled_canvas((size[1], size[0]), (64, 64), 1, 4)
    assert pixels.shape[0] == rows * cols + 1 > 2
    assert infer_tile_grid(pixels) == (rows, cols)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_probes_are_the_towers_attention_pooled_per_group(qk_norm, processor):
    """What a strategy sees per tile: the [CLS] row and the attention received (eager attention weights of the
    unpatched tower, [CLS] query left out for "received") summed over each token's 2x2 patch group, and the
    feature layer's keys averaged over heads and the group."""
    model = tiny_internvl("qwen2", seed=2, use_qk_norm=qk_norm)
    inputs = internvl_inputs(processor, ["What is it?"], [[make_wide_image(4)]])
    seen = {}

    class Echo(vtc.Strategy):
        name = "echo_probes"

        def vision_probes(self, num_layers, feature_layer):
            return {"cls": [1, feature_layer], "received": [feature_layer], "keys": [feature_layer]}

        def select(self, visual):
            for i, unit in enumerate(visual.image_index.tolist()):
                seen[unit] = (visual.cls_attention[1][i], visual.received_attention[3][i], visual.vision["keys"][3][i])
            return super().select(visual)

    tower = model.model.vision_tower
    with torch.no_grad():
        tower.config._attn_implementation = "eager"  # attention weights for the oracle only
        try:
            ref = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        finally:
            tower.config._attn_implementation = "sdpa"
        with vtc.patched(model, Echo(keep=1.0)):
            model(**inputs)
        layer = tower.encoder.layer[3]
        normed = layer.layernorm_before(ref.hidden_states[3])
        keys = layer.attention.k_norm(layer.attention.k_proj(normed)).view(3, 65, 4, 8).mean(2)[:, 1:]

    def pool(x, how):  # (3, C, 64) on the 8 x 8 patch grid -> (3, C, 16): 2x2 groups in raster order
        blocks = x.reshape(3, x.shape[1], 4, 2, 4, 2)
        return blocks.sum((3, 5)).flatten(2) if how == "sum" else blocks.mean((3, 5)).flatten(2)

    cls = pool(ref.attentions[1][:, :, 0, 1:], "sum")
    received = pool(ref.attentions[3][:, :, 1:, 1:].mean(2), "sum")
    key = pool(keys.transpose(1, 2), "mean")
    assert sorted(seen) == [0, 1, 2]
    for tile in range(3):
        assert torch.allclose(seen[tile][0], cls[tile], atol=1e-6)
        assert torch.allclose(seen[tile][1], received[tile], atol=1e-6)
        assert torch.allclose(seen[tile][2], key[tile], atol=1e-5)


def test_hired_treats_the_thumbnail_as_the_full_image(model, cases):
    """HiRED on tiles: the thumbnail ("base") gets int(T * alpha) of the picture's budget T = int(P * 16 * r),
    the crops share the rest by where the thumbnail's top layer-0 [CLS] tokens fall (crop boxes scaled onto
    the thumbnail), a single-tile picture keeps int(16 * r); the result equals the oracle."""
    from vtc.strategies.base import top_k_sorted

    inputs = cases["image"]
    full = lm_inputs(model, inputs)
    tower = model.model.vision_tower
    with torch.no_grad():
        tower.config._attn_implementation = "eager"  # attention weights for the oracle only
        try:
            attn = tower(inputs["pixel_values"], output_attentions=True).attentions[0][:, :, 0, 1:]
        finally:
            tower.config._attn_implementation = "sdpa"
        with vtc.patched(model, "hired", keep=0.25) as handle:
            out = model(**inputs).logits
            kept = handle.last_kept("pre_llm")
            budgets = dict(handle.strategy.budgets)
            units = kept_by_unit(handle, "pre_llm")
    cls0 = attn.sum(1).reshape(12, 4, 2, 4, 2).sum((2, 4)).flatten(1)  # (tiles, 16): heads and 2x2 groups summed
    top = top_k_sorted(cls0, 8)  # the top N * (1 - alpha) of every tile; used for the thumbnails
    # wide picture: thumbnail = tile 2, crops (0, 0) / (0, 1) cover thumbnail columns 0-1 / 2-3
    left = int((top[2] % 4 < 2).sum())
    assert [budgets[u] for u in (0, 1, 2)] == [left * 6 // 8, (8 - left) * 6 // 8, 6]
    # square picture (2 x 2 crops): thumbnail = tile 7, crop (i, j) covers rows 2i..2i+1, columns 2j..2j+1
    quads = [int(((top[7] // 4 // 2 == i) & (top[7] % 4 // 2 == j)).sum()) for i in (0, 1) for j in (0, 1)]
    assert [budgets[u] for u in range(3, 8)] == [q * 10 // 8 for q in quads] + [10]
    assert budgets[11] == 4  # the single-tile picture: one partition
    assert [len(r["kept"]) for r in units[2]][-1] == 4
    for b in range(3):
        oracle = compacted_oracle_logits(model, inputs, kept, b, full)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


def test_video_frames_are_units(model, cases):
    inputs = cases["video"]
    with torch.no_grad(), vtc.patched(model, "fopru", keep=2) as handle:
        model(**inputs)
        report = handle.report()
        units = kept_by_unit(handle)
    assert [[(r["image"], r["role"], len(r["kept"])) for r in rows] for rows in units] == [
        [(0, "base", 2), (1, "base", 2), (2, "base", 2)],
        [(3, "base", 2), (4, "base", 2)],
    ]
    assert [s.visual_in for s in report.samples] == [48, 32]
    assert [s.visual_after_pre_llm for s in report.samples] == [6, 4]


@pytest.mark.parametrize(
    "case,strategy", [("image", "vtc_cls"), ("image", "fastv"), ("image", "tome"), ("video", "fastv")]
)
def test_generate_with_cache_equals_recompute(case, strategy, model, cases):
    assert_cached_generate_equals_recompute(model, cases[case], strategy, 4, keep=0.25)


@pytest.mark.parametrize("strategy", ["vtc_cls", "fastv"])
def test_batch_equals_each_sample_alone(strategy, model, processor, cases):
    alone = {b: internvl_inputs(processor, [QUESTIONS[b]], [IMAGES[b]]) for b in (0, 2)}  # wide; two pictures
    assert_batch_equals_each_sample_alone(model, cases["image"], alone, strategy, keep=0.25, stop_at_eos=True)


def test_multi_image_sample_budgets_each_picture(model, cases):
    """The two pictures of sample 2 (3 tiles and 1 tile) each keep keep * 16 per tile; the report lists its
    4 units; their kept tokens index the sample's visual tokens, pictures concatenated in order."""
    inputs = cases["image"]
    with torch.no_grad(), vtc.patched(model, "vtc_cls", keep=0.5) as handle:
        model(**inputs)
        report = handle.report()
        kept = handle.last_kept("pre_llm")[2]
        units = kept_by_unit(handle, "pre_llm")[2]
    assert report.samples[2].visual_in == 64 and report.samples[2].visual_after_pre_llm == 32
    assert report.samples[2].images == [8, 9, 10, 11]
    assert [u["image"] for u in units] == [2, 2, 2, 3]
    assert bool((kept[kept >= 48] < 64).all()) and int((kept >= 48).sum()) == 8  # the small picture's 8


def test_patching_one_model_leaves_another(model, cases):
    other = tiny_internvl("qwen2", seed=0)
    inputs = cases["image"]
    with torch.no_grad():
        ref = other(**inputs).logits
        hooks, attributes = hook_count(other), instance_attributes(other)
        with vtc.patched(model, "vtc_cls", keep=0.25):
            assert torch.equal(other(**inputs).logits, ref)
            assert hook_count(other) == hooks and instance_attributes(other) == attributes


def test_unpatch_restores_exactly(model, cases):
    def installed(m):  # what the patch puts on the instance
        return "forward" in vars(m.model.language_model)

    assert_unpatch_restores_image_and_video(model, cases["image"], cases["video"], "visionzip", installed, keep=0.25)


def test_text_only_passes_through(model, processor):
    inputs = internvl_inputs(processor, ["Where is the small object?", "How many?"])
    assert_text_only_passes_through(model, inputs, "vtc_cls", generate_tokens=3)


def test_bad_input_fails_loud(model, cases):
    inputs = cases["image"]
    hooks = hook_count(model)
    with pytest.raises(ValueError, match=r"keep=17 tokens is above the 16"):
        vtc.patch(model, "vtc_cls", keep=17)
    assert "forward" not in vars(model.model.language_model) and hook_count(model) == hooks
    with vtc.patched(model, "vtc_cls", keep=0.5), pytest.raises(RuntimeError, match="in one call"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # image tokens, no pixels
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(NotImplementedError, match="use 'default'"):
            vtc.patch(model, "fastv", keep=0.5)
    finally:
        model.config.vision_feature_select_strategy = "default"
    assert "forward" not in vars(model.model.language_model) and hook_count(model) == hooks
    assert "InternVLForConditionalGeneration" in vtc.supported_models()
