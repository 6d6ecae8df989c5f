"""DESIGN.md section 4 invariants on the Qwen2-VL / Qwen2.5-VL adapter: dynamic resolution, the 2x2 merger,
window attention (2.5), videos (frames as units), M-RoPE positions and the [CLS] surrogate probe."""

import pytest
import torch

import vtc
from vtc.testing import make_image
from vtc.testing.qwen2_vl import make_video, qwen_inputs, tiny_qwen_processor, tiny_qwen_vl

from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_cached_generate_equals_recompute,
    assert_generate_keep_one_equals_unpatched,
    assert_keep_one_is_identity,
    assert_mrope_decode_positions_are_logical,
    assert_text_only_passes_through,
    assert_unpatch_restores_exactly,
    kept_rows,
    mrope_greedy_recompute,
    mrope_positions,
    per_unit_kept,
)

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
PRE_LLM = ["vtc_cls", "fopru"]
ALL = ["none", *PRE_LLM, "fastv"]


@pytest.fixture(scope="module")
def qprocessor():
    return tiny_qwen_processor()


@pytest.fixture(scope="module")
def models():
    return {family: tiny_qwen_vl(family, seed=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def qbatch(qprocessor):
    """Sample 0: one square image (4x4 tokens); sample 1: two images of other shapes (3x5, 3x3); sample 2: a
    4-frame video (2 temporal patches of 2x3 tokens). Different prompt lengths, so left padding."""
    questions = ["What is in the image?", "Compare the pictures.", "How many objects are there? Answer with one word."]
    images = [[make_image(0, size=112)], [make_image(1).resize((140, 84)), make_image(2, size=84)], []]
    videos = [[], [], [make_video(3)]]
    return questions, images, videos, qwen_inputs(qprocessor, questions, images, videos)


def full_sequence(model, inputs):
    """inputs_embeds with image/video features scattered in and the (3, B, L) M-RoPE ids, as HF builds them."""
    inner, config = model.model, model.config
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    if "pixel_values" in inputs:
        feats = torch.cat(inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((ids == config.image_token_id)[..., None], feats)
    if "pixel_values_videos" in inputs:
        feats = torch.cat(
            inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        )
        embeds = embeds.masked_scatter((ids == config.video_token_id)[..., None], feats)
    return embeds, mrope_positions(model, inputs), inputs["mm_token_type_ids"] > 0


def oracle_logits(model, inputs, full, kept, b):
    """Unpatched language model on sample b's compacted sequence at the kept tokens' original 3-D positions."""
    embeds, positions, visual = full
    rows = kept_rows(inputs, visual, kept, b)
    out = model.model.language_model(
        inputs_embeds=embeds[b : b + 1, rows],
        position_ids=positions[:, b : b + 1, rows],
        attention_mask=torch.ones(1, len(rows), dtype=torch.long),
        use_cache=False,
    )
    return model.lm_head(out.last_hidden_state)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ALL)
def test_keep_one_is_identity(family, strategy, models, qbatch):
    assert_keep_one_is_identity(models[family], qbatch[3], strategy)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_is_identity_eager(family, qbatch):
    assert_keep_one_is_identity(tiny_qwen_vl(family, seed=2, attn_implementation="eager"), qbatch[3], "fastv")


@pytest.mark.parametrize(
    "family,strategy,keep",
    [
        ("qwen2_vl", "vtc_cls", 0.5),
        ("qwen2_vl", "fopru", 2),
        ("qwen2_5_vl", "vtc_cls", 2),
        ("qwen2_5_vl", "fopru", 0.5),
    ],
)
def test_pre_llm_equals_oracle_and_budgets_per_unit(family, strategy, keep, models, qbatch):
    model, inputs = models[family], qbatch[3]
    with torch.no_grad(), vtc.patched(model, strategy, keep=keep) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        layout = handle.adapter.last_layout
    units = layout.extras["units"]
    assert [(u["kind"], u["index"], u["t"], u["grid"]) for u in units] == [
        ("image", 0, 0, (4, 4)),
        ("image", 1, 0, (3, 5)),
        ("image", 2, 0, (3, 3)),
        ("video", 0, 0, (2, 3)),
        ("video", 0, 1, (2, 3)),
    ]
    assert layout.sample_of_image == [0, 1, 1, 2, 2]
    expected = [2] * 5 if keep == 2 else [8, 8, 5, 3, 3]  # round(n * keep) per image and per frame
    assert per_unit_kept(layout, kept) == expected
    with torch.no_grad():
        full = full_sequence(model, inputs)
    for b in range(3):
        assert torch.equal(kept[b], kept[b].sort().values)
        with torch.no_grad():
            oracle = oracle_logits(model, inputs, full, kept, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "family,strategy",
    [("qwen2_vl", "vtc_cls"), ("qwen2_vl", "fastv"), ("qwen2_5_vl", "fopru"), ("qwen2_5_vl", "fastv")],
)
def test_generate_with_cache_equals_recompute(family, strategy, models, qbatch):
    assert_cached_generate_equals_recompute(models[family], qbatch[3], strategy, 4, mrope_greedy_recompute, keep=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_keep_one_equals_unpatched(family, models, qbatch):
    assert_generate_keep_one_equals_unpatched(models[family], qbatch[3], 5)


def test_generate_without_cache_equals_cached(models, qbatch):
    """generate(use_cache=False) re-runs the prefill on the encoder outputs computed once: same grids and probes."""
    model, inputs = models["qwen2_5_vl"], qbatch[3]
    with torch.no_grad(), vtc.patched(model, "vtc_cls", keep=0.5):
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_positions_are_logical(family, models, qprocessor):
    """A manual decode step with no mask and no position ids: HF would derive positions from the physical
    (pruned, shorter) cache; the adapter gives the logical ones, so the step equals the no-cache recompute."""
    model = models[family]
    inputs = qwen_inputs(qprocessor, ["Describe the picture in detail, please."], [[make_image(5, size=112)]])
    inputs.pop("attention_mask")
    assert_mrope_decode_positions_are_logical(model, inputs)


@pytest.mark.parametrize("family,strategy", [("qwen2_vl", "vtc_cls"), ("qwen2_5_vl", "fopru"), ("qwen2_5_vl", "fastv")])
def test_batch_equals_each_sample_alone(family, strategy, models, qprocessor, qbatch):
    questions, images, videos, inputs = qbatch
    alone = {b: qwen_inputs(qprocessor, [questions[b]], [images[b]], [videos[b]]) for b in range(3)}
    assert_batch_equals_each_sample_alone(models[family], inputs, alone, strategy, keep=0.5)


def _dense_received(model, inputs, layer):
    """Oracle for the [CLS] surrogate: the full attention matrix of vision block `layer` for the images, masked
    to each image (and, in windowed layers, to each window) from the patches' (h, w) coordinates, mean over
    queries, then averaged over the 2x2 patches of each merged token located by their coordinates."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    grid = inputs["image_grid_thw"]
    captured = {}
    hook = visual.blocks[layer].attn.register_forward_pre_hook(
        lambda m, a, k: captured.update(hidden=a[0], pe=k["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], grid)
    hook.remove()
    attn, hidden = visual.blocks[layer].attn, captured["hidden"]
    n = hidden.shape[0]
    coords = get_vision_position_ids(grid, 2)  # (n, 2) h, w per patch in the processor's order
    image = torch.repeat_interleave(torch.arange(len(grid)), grid.prod(-1))
    windowed = hasattr(visual, "fullatt_block_indexes") and layer not in visual.fullatt_block_indexes
    if hasattr(visual, "fullatt_block_indexes"):  # the tower runs on window-permuted patches
        window_index, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        order = torch.arange(n).view(-1, 4)[window_index].reshape(-1)
        coords, image = coords[order], image[order]
    win = visual.config.window_size // 2 // visual.patch_size if windowed else 10**6
    segment = image * 10**6 + (coords[:, 0] // 2 // win) * 1000 + coords[:, 1] // 2 // win
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        q, k = apply_rotary_pos_emb_vision(q, k, *captured["pe"])
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * attn.scaling
        same = segment[:, None] == segment[None, :]
        probs = scores.masked_fill(~same, float("-inf")).softmax(-1)
        received = (probs * (1.0 / same.sum(1)).view(1, -1, 1)).sum(1)  # (H, n): mean over each segment's queries
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (grid.prod(-1) // 4).cumsum(0)[:-1]])
    widths = grid[:, 2] // 2
    merged = starts[image] + (coords[:, 0] // 2) * widths[image] + coords[:, 1] // 2
    out = torch.zeros(attn.num_heads, int((grid.prod(-1) // 4).sum())).index_add_(1, merged, received / 4)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cls_surrogate_equals_dense_oracle(family, models, qprocessor):
    model = models[family]
    images = [make_image(6).resize((84, 112)), make_image(7).resize((140, 84))]  # 4x3 and 3x5 token grids
    inputs = qwen_inputs(qprocessor, ["Compare."], [images])
    with torch.no_grad(), vtc.patched(model, "vtc_cls", keep=0.25, start_layer=0) as handle:
        model(**inputs)
        assert "no [CLS]" in handle.adapter.notes[0]
        probes = handle.adapter._probes["cls"]
        counts = handle.adapter.last_layout.counts
    assert counts == [12, 15]
    for layer in range(4):  # Qwen2.5-VL tiny: layers 0 and 2 windowed, 1 and 3 full attention
        oracle = _dense_received(model, inputs, layer)
        flat = torch.cat([probes[layer][i, :, :c] for i, c in enumerate(counts)], dim=-1)
        assert torch.allclose(flat, oracle, atol=1e-5), layer


def test_unpatch_restores_exactly(qbatch):
    for family in FAMILIES:
        model = tiny_qwen_vl(family, seed=4)
        inputs = qbatch[3]
        assert_unpatch_restores_exactly(model, inputs, "vtc_cls", generate_tokens=2, keep=0.25)
        vtc.patch(model, "fastv").unpatch()


def test_text_only_passes_through(models, qprocessor):
    model = models["qwen2_5_vl"]
    inputs = qwen_inputs(qprocessor, ["Where is the small object?", "How many?"])
    assert_text_only_passes_through(model, inputs, "vtc_cls", generate_tokens=4)


def test_bad_inputs_fail_clearly(qprocessor, qbatch):
    model = tiny_qwen_vl("qwen2_vl", seed=5)
    video_only = qwen_inputs(qprocessor, ["What happens?"], [[]], [[make_video(1)]])
    with torch.no_grad():
        # vision features computed before patching: the [CLS] surrogate cannot be read
        features = {
            "video": model.model.get_video_features(video_only["pixel_values_videos"], video_only["video_grid_thw"])
        }
        rest = {k: v for k, v in video_only.items() if k != "pixel_values_videos"}
        with vtc.patched(model, "vtc_cls", keep=0.5):
            with pytest.raises(RuntimeError, match="pass pixel values"):
                model(**rest, mm_encoder_outputs=features)
        with vtc.patched(model, "fastv", keep=0.5):  # no vision probe needed: works
            model(**rest, mm_encoder_outputs=features)
        model.config.__dict__["video_token_id"] = None  # a model without a video path (bypasses validation)
        with vtc.patched(model, "fastv", keep=0.5):
            with pytest.raises(ValueError, match="no video token"):
                model(**video_only)
    assert "forward" not in vars(model.model.language_model)


def test_int_keep_is_an_upper_bound_per_image_on_dynamic_resolution():
    """Image sizes are only known at run time here, so an int keep caps each image: a small image keeps all of
    its tokens, a larger one exactly `keep` (no error, unlike fixed-grid models where patch() checks it)."""
    model, processor = tiny_qwen_vl("qwen2_vl", seed=1), tiny_qwen_processor()
    inputs = qwen_inputs(processor, ["What?", "What?"], images=[[make_image(0, size=56)], [make_image(1, size=112)]])
    with torch.no_grad(), vtc.patched(model, "vtc_cls", keep=9) as handle:
        model(**inputs)
        report = handle.report()
    assert [(s.visual_in, s.visual_after_pre_llm) for s in report.samples] == [(4, 4), (16, 9)]


def test_real_processor_matches_the_tiny_one(qprocessor):
    """`tiny_qwen2_vl_processor` (transformers' Qwen2VLProcessor) gives the inputs of `TinyQwenVLProcessor`."""
    from transformers import Qwen2VLProcessor

    from vtc.testing.qwen2_vl import tiny_qwen2_vl_processor

    real = tiny_qwen2_vl_processor()
    assert isinstance(real, Qwen2VLProcessor)
    images = [make_image(0), make_image(1, size=64)]
    questions = ["what colour is the circle?", "where?"]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = [real.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    got = real(text=texts, images=images, return_tensors="pt", padding=True)
    want = qwen_inputs(qprocessor, questions, [[images[0]], [images[1]]])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(got[key], want[key]), key
