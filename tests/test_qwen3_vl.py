"""DESIGN.md section 4 invariants on the Qwen3-VL adapter (dense and MoE): DeepStack features follow every
selection, interleaved M-RoPE positions, videos as timestamped frames (one unit each), the [CLS] surrogate.

The oracles are built by hand from HF's own text model: the unpatched `Qwen3VLTextModel` run on the compacted
sequence, with the kept tokens' original 3-D positions and only the kept tokens' DeepStack features."""

import copy

import pytest
import torch

import vtc
from vtc.testing import make_image
from vtc.testing.qwen2_vl import make_video
from vtc.testing.qwen3_vl import qwen3_inputs, tiny_qwen3_processor, tiny_qwen3_vl

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

FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module")
def q3processor():
    return tiny_qwen3_processor()


@pytest.fixture(scope="module")
def q3models():
    return {family: tiny_qwen3_vl(family, seed=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def q3batch(q3processor):
    """Sample 0: one square image (4x4 tokens); sample 1: two images (3x5, 3x3); sample 2: a small image (2x2) and
    a 4-frame video (2 timestamped temporal patches of 2x3 tokens). Different prompt lengths: left padding."""
    questions = ["What is in the image?", "Compare the pictures.", "How many objects are there? Answer with one word."]
    images = [[make_image(0, size=128)], [make_image(1).resize((160, 96)), make_image(2, size=96)], [make_image(3, 64)]]
    videos = [[], [], [make_video(4, size=(64, 96))]]
    return questions, images, videos, qwen3_inputs(q3processor, questions, images, videos)


def full_sequence(model, inputs) -> dict:
    """What HF's Qwen3VLModel hands its language model, built by hand: embeddings with the image/video features
    scattered in, (3, B, L) M-RoPE ids, the visual mask and, per DeepStack layer, the (n_visual, D) features in
    the order of the flat visual tokens (row-major over the batch, images and videos interleaved as they appear)."""
    inner, config = model.model, model.config
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    is_image, is_video = ids == config.image_token_id, ids == config.video_token_id
    visual = is_image | is_video
    deepstack = None
    for mask, pixels, grid in (
        (is_image, "pixel_values", "image_grid_thw"),
        (is_video, "pixel_values_videos", "video_grid_thw"),
    ):
        if pixels not in inputs:
            continue
        out = inner.get_image_features(inputs[pixels], inputs[grid])
        embeds = embeds.masked_scatter(mask[..., None], torch.cat(out.pooler_output))
        if deepstack is None:
            deepstack = [embeds.new_zeros(int(visual.sum()), embeds.shape[-1]) for _ in out.deepstack_features]
        for joint, feats in zip(deepstack, out.deepstack_features):
            joint[mask[visual]] = torch.cat(feats)
    positions = mrope_positions(model, inputs)
    return {"embeds": embeds, "positions": positions, "visual": visual, "deepstack": deepstack}


def sample_rows(inputs, full, kept_b, b):
    """Sample b's valid text tokens and the visual tokens `kept_b` (indices into its visual tokens): (rows into the
    sequence, flat visual indices kept)."""
    visual = full["visual"]
    return kept_rows(inputs, visual, {b: kept_b}, b), int(visual[:b].sum()) + kept_b


def text_model_slice(lm, start: int, stop: int, final_norm: bool):
    """HF's text model class running only decoder layers start..stop-1 of `lm` (shared weights); without the
    final norm when `final_norm` is False (the output then feeds layer `stop`)."""
    config = copy.deepcopy(lm.config)
    config.num_hidden_layers = stop - start
    sub = type(lm)(config).eval()
    sub.layers = torch.nn.ModuleList(lm.layers[start:stop])
    sub.rotary_emb = lm.rotary_emb
    sub.norm = lm.norm if final_norm else torch.nn.Identity()
    return sub


def run_text_model(lm, hidden, positions, visual, deepstack):
    out = lm(
        inputs_embeds=hidden,
        position_ids=positions,
        attention_mask=torch.ones(hidden.shape[:2], dtype=torch.long),
        visual_pos_masks=visual,
        deepstack_visual_embeds=deepstack or None,
        use_cache=False,
    )
    return out.last_hidden_state


def pre_llm_oracle(model, inputs, full, kept, b):
    """Unpatched text model on sample b with only the kept visual tokens: their embeddings, original 3-D positions
    and DeepStack features."""
    rows, flat = sample_rows(inputs, full, kept[b], b)
    hidden = run_text_model(
        model.model.language_model,
        full["embeds"][b : b + 1, rows],
        full["positions"][:, b : b + 1, rows],
        full["visual"][b : b + 1, rows],
        [d[flat] for d in full["deepstack"]],
    )
    return model.lm_head(hidden)[0]


def in_llm_oracle(model, inputs, full, kept, b, layer):
    """Unpatched text model on sample b: layers 0..layer-1 on the whole sequence (all DeepStack injections up to
    there), then the unkept visual tokens dropped, layers layer.. on the rest, later injections to the kept ones."""
    lm = model.model.language_model
    n_layers = lm.config.num_hidden_layers
    valid = inputs["attention_mask"][b].bool()
    all_rows, all_flat = sample_rows(inputs, full, torch.arange(int(full["visual"][b].sum())), b)
    assert torch.equal(all_rows, valid.nonzero().squeeze(1))
    lower = text_model_slice(lm, 0, layer, final_norm=False)
    hidden = run_text_model(
        lower,
        full["embeds"][b : b + 1, all_rows],
        full["positions"][:, b : b + 1, all_rows],
        full["visual"][b : b + 1, all_rows],
        [d[all_flat] for d in full["deepstack"][:layer]],
    )
    rows, flat = sample_rows(inputs, full, kept[b], b)
    keep_local = torch.searchsorted(all_rows, rows)  # the kept rows among the valid ones
    upper = text_model_slice(lm, layer, n_layers, final_norm=True)
    hidden = run_text_model(
        upper,
        hidden[:, keep_local],
        full["positions"][:, b : b + 1, rows],
        full["visual"][b : b + 1, rows],
        [d[flat] for d in full["deepstack"][layer:]],
    )
    return model.lm_head(hidden)[0]


def test_registered():
    assert {"Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"} <= set(vtc.supported_models())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["none", "vtc_cls", "fopru", "fastv"])
def test_keep_one_is_identity(family, strategy, q3models, q3batch):
    assert_keep_one_is_identity(q3models[family], q3batch[3], strategy)


def test_keep_one_is_identity_eager(q3batch):
    assert_keep_one_is_identity(tiny_qwen3_vl("qwen3_vl", seed=2, attn_implementation="eager"), q3batch[3], "fastv")


def test_deepstack_is_injected(q3models, q3batch):
    """The identity above holds only because the DeepStack features are added: without the hook (or without the
    features in the unpatched model) the logits move."""
    model, inputs = q3models["qwen3_vl"], q3batch[3]
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        full = full_sequence(model, inputs)
        plain = model.lm_head(
            model.model.language_model(
                inputs_embeds=full["embeds"], position_ids=full["positions"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
        )
        with vtc.patched(model, "none") as handle:
            handle.adapter.after_decoder_layer = lambda layer, seq: None  # instance override: injection off
            without = model(**inputs).logits
    assert (plain - ref)[valid].abs().max() > 1e-2
    assert (without - plain)[valid].abs().max() <= 1e-5


@pytest.mark.parametrize(
    "family,strategy,keep", [("qwen3_vl", "vtc_cls", 0.5), ("qwen3_vl", "fopru", 2), ("qwen3_vl_moe", "vtc_cls", 2)]
)
def test_pre_llm_equals_oracle_and_budgets_per_unit(family, strategy, keep, q3models, q3batch):
    model, inputs = q3models[family], q3batch[3]
    with torch.no_grad(), vtc.patched(model, strategy, keep=keep) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        layout = handle.adapter.last_layout
    units = layout.extras["units"]
    assert [(u["kind"], u["index"], u["t"], u["grid"]) for u in units] == [
        ("image", 0, 0, (4, 4)),
        ("image", 1, 0, (3, 5)),
        ("image", 2, 0, (3, 3)),
        ("image", 3, 0, (2, 2)),
        ("video", 0, 0, (2, 3)),
        ("video", 0, 1, (2, 3)),
    ]
    assert layout.sample_of_image == [0, 1, 1, 2, 2, 2]
    expected = [2] * 6 if keep == 2 else [8, 8, 5, 2, 3, 3]  # round(n * keep) per image and per frame
    assert per_unit_kept(layout, kept) == expected
    with torch.no_grad():
        full = full_sequence(model, inputs)
        for b in range(3):
            assert torch.equal(kept[b], kept[b].sort().values)
            oracle = pre_llm_oracle(model, inputs, full, kept, b)
            assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("family,layer", [("qwen3_vl", 2), ("qwen3_vl", 1), ("qwen3_vl_moe", 2)])
def test_fastv_equals_in_llm_oracle(family, layer, q3models, q3batch):
    """FastV drops tokens before layer K; the DeepStack injections after layers >= K reach only the survivors."""
    model, inputs = q3models[family], q3batch[3]
    with torch.no_grad(), vtc.patched(model, "fastv", keep=0.5, layer=layer) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept()
        assert handle.last_kept("pre_llm")[0].numel() == 16
        report = handle.report()
    assert [s.visual_per_layer[layer - 1] > s.visual_per_layer[layer] for s in report.samples] == [True] * 3
    with torch.no_grad():
        full = full_sequence(model, inputs)
        for b in range(3):
            oracle = in_llm_oracle(model, inputs, full, kept, b, layer)
            assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("family,strategy", [("qwen3_vl", "vtc_cls"), ("qwen3_vl", "fastv"), ("qwen3_vl_moe", "fopru")])
def test_generate_with_cache_equals_recompute(family, strategy, q3models, q3batch):
    model, inputs = q3models[family], q3batch[3]
    assert_cached_generate_equals_recompute(
        model, inputs, strategy, 4, mrope_greedy_recompute, also_uncached=True, keep=0.5
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_keep_one_equals_unpatched(family, q3models, q3batch):
    assert_generate_keep_one_equals_unpatched(q3models[family], q3batch[3], 5)


def test_decode_positions_are_logical(q3models, q3processor):
    """A manual decode step with no mask and no position ids continues at the logical positions (the physical
    cache is shorter), so it equals the no-cache recompute."""
    model = q3models["qwen3_vl"]
    inputs = qwen3_inputs(q3processor, ["Describe the picture in detail, please."], [[make_image(5, size=128)]])
    inputs.pop("attention_mask")
    assert_mrope_decode_positions_are_logical(model, inputs)


@pytest.mark.parametrize("family,strategy", [("qwen3_vl", "vtc_cls"), ("qwen3_vl", "fastv"), ("qwen3_vl_moe", "fastv")])
def test_batch_equals_each_sample_alone(family, strategy, q3models, q3processor, q3batch):
    questions, images, videos, inputs = q3batch
    alone = {b: qwen3_inputs(q3processor, [questions[b]], [images[b]], [videos[b]]) for b in range(3)}
    assert_batch_equals_each_sample_alone(q3models[family], inputs, alone, strategy, keep=0.5)


def test_cls_surrogate_equals_dense_oracle(q3models, q3processor):
    """The surrogate probe = the full attention matrix of the vision block (HF's rotary applied), masked to each
    image, mean over queries, averaged over the 4 patches the merger groups (4 consecutive patches)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    model = q3models["qwen3_vl"]
    inputs = qwen3_inputs(
        q3processor, ["Compare."], [[make_image(6).resize((96, 128)), make_image(7).resize((160, 96))]]
    )
    layer = 1
    with torch.no_grad(), vtc.patched(model, "fopru", keep=0.25, layer=layer) as handle:
        model(**inputs)
        probe = handle.adapter._probes["received"][layer]
        counts = handle.adapter.last_layout.counts
    assert counts == [12, 15]
    attn, captured = model.model.visual.blocks[layer].attn, {}
    hook = attn.register_forward_pre_hook(
        lambda m, a, k: captured.update(hidden=a[0], pe=k["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    hook.remove()
    hidden = captured["hidden"]
    n = hidden.shape[0]
    image = torch.repeat_interleave(torch.arange(2), inputs["image_grid_thw"].prod(-1))
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *captured["pe"])
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * attn.scaling
        same = image[:, None] == image[None, :]
        probs = scores.masked_fill(~same, float("-inf")).softmax(-1)
        received = (probs / same.sum(1).view(1, -1, 1)).sum(1)  # (H, n)
    oracle = received.view(attn.num_heads, -1, 4).mean(-1)
    flat = torch.cat([probe[i, :, :c] for i, c in enumerate(counts)], dim=-1)
    assert torch.allclose(flat, oracle, atol=1e-5)


def test_unpatch_restores_exactly(q3batch):
    model, inputs = tiny_qwen3_vl("qwen3_vl_moe", seed=4), q3batch[3]
    assert_unpatch_restores_exactly(model, inputs, "vtc_cls", generate_tokens=2, keep=0.25)


def test_patching_one_model_leaves_another(q3models, q3batch):
    model, other, inputs = q3models["qwen3_vl"], tiny_qwen3_vl("qwen3_vl", seed=1), q3batch[3]
    with torch.no_grad():
        ref = other(**inputs).logits
        with vtc.patched(model, "fastv", keep=0.25):
            assert torch.equal(other(**inputs).logits, ref)
    assert "forward" not in vars(other.model.language_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_passes_through(family, q3models, q3processor):
    inputs = qwen3_inputs(q3processor, ["Where is the small object?", "How many?"])
    assert_text_only_passes_through(q3models[family], inputs, "vtc_cls", generate_tokens=4)


def test_bad_inputs_fail_clearly(q3models):
    model = q3models["qwen3_vl"]
    with pytest.raises(ValueError, match=r"\[CLS\]"):  # HiRED needs a real [CLS]
        vtc.patch(model, "hired", keep=0.25)
    with pytest.raises(ValueError, match="layer"):
        vtc.patch(model, "fastv", keep=0.25, layer=9)
    assert "forward" not in vars(model.model.language_model)
