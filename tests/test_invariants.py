"""DESIGN.md section 4 invariants on the LLaVA-1.5 adapter, for every strategy of the spine."""

import pytest
import torch

import vtc
from vtc.testing import llava_inputs, make_image, tiny_llava

from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_cached_generate_equals_recompute,
    assert_generate_keep_one_equals_unpatched,
    assert_keep_one_is_identity,
    assert_text_only_passes_through,
    assert_unpatch_restores_exactly,
    hook_count,
    pre_llm_oracle_logits,
    upper_layers,
)

PRE_LLM = [("vtc_cls", {}), ("fopru", {}), ("fopru", {"mode": "row"})]
ALL = [*PRE_LLM, ("fastv", {}), ("fastv", {"queries": "text"}), ("none", {})]


def ids(params):
    return [name + "".join(f"-{v}" for v in options.values()) for name, options in params]


@pytest.mark.parametrize("backbone", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy,options", ALL, ids=ids(ALL))
def test_keep_one_is_identity(backbone, attn, strategy, options, processor, batch3):
    assert_keep_one_is_identity(tiny_llava(backbone, seed=1, attn_implementation=attn), batch3[2], strategy, **options)


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy,options", PRE_LLM, ids=ids(PRE_LLM))
@pytest.mark.parametrize("keep", [0.25, 5])
def test_pre_llm_equals_oracle(backbone, strategy, options, keep, batch3):
    model = tiny_llava(backbone, seed=2)
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(model, strategy, keep=keep, **options) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        report = handle.report()
    per_image = 5 if isinstance(keep, int) else round(36 * keep)
    assert [len(k) for k in kept] == [per_image, per_image, 2 * per_image]
    assert [s.visual_after_pre_llm for s in report.samples] == [len(k) for k in kept]
    for b in range(3):
        assert torch.equal(kept[b], kept[b].sort().values)
        with torch.no_grad():
            oracle = pre_llm_oracle_logits(model, inputs, kept, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("layer,keep", [(2, 0.5), (1, 0.25), (3, 7)])
def test_fastv_selection_and_logits_equal_oracle(layer, keep, single):
    """Oracle: eager attention weights of the unpatched model pick the tokens; HF's own forward of layers
    K.. on the compacted hidden states gives the logits."""
    model = tiny_llava("llama", seed=3, attn_implementation="eager")
    with torch.no_grad():
        ref = model(**single, output_attentions=True, output_hidden_states=True)
    visual = single["input_ids"][0] == model.config.image_token_id
    scores = ref.attentions[layer - 1][0, :, -1].mean(0)[visual]
    n_keep = keep if isinstance(keep, int) else round(36 * keep)
    expected = scores.topk(n_keep).indices.sort().values

    with torch.no_grad(), vtc.patched(model, "fastv", keep=keep, layer=layer) as handle:
        out = model(**single).logits
        assert torch.equal(handle.last_kept("final")[0], expected)
        assert len(handle.last_kept("pre_llm")[0]) == 36
        per_layer = handle.report().samples[0].visual_per_layer
    assert per_layer == [36] * layer + [n_keep] * (4 - layer)

    rows = (~visual).clone()
    rows[visual.nonzero().squeeze(1)[expected]] = True
    rows = rows.nonzero().squeeze(1)
    sub = upper_layers(model.model.language_model, layer)
    with torch.no_grad():
        hidden = sub(
            inputs_embeds=ref.hidden_states[layer][:, rows],
            position_ids=rows[None],
            attention_mask=torch.ones(1, len(rows), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        oracle = model.lm_head(hidden)
    assert (out - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("strategy,options", [*PRE_LLM, ("fastv", {})], ids=ids([*PRE_LLM, ("fastv", {})]))
def test_generate_with_cache_equals_recompute(strategy, options, llava, batch3):
    assert_cached_generate_equals_recompute(llava, batch3[2], strategy, 6, keep=0.25, **options)


def test_generate_keep_one_equals_unpatched(llava, batch3):
    assert_generate_keep_one_equals_unpatched(llava, batch3[2], 6)


@pytest.mark.parametrize("strategy,options", [*PRE_LLM, ("fastv", {})], ids=ids([*PRE_LLM, ("fastv", {})]))
def test_batch_equals_each_sample_alone(strategy, options, llava, processor, batch3):
    questions, images, inputs = batch3
    alone = {b: llava_inputs(processor, [questions[b]], [images[b]]) for b in range(3)}
    assert_batch_equals_each_sample_alone(llava, inputs, alone, strategy, tokens=5, keep=0.25, **options)


def test_unpatch_restores_exactly(batch3):
    model = tiny_llava("llama", seed=4)
    inputs = batch3[2]
    handle = assert_unpatch_restores_exactly(model, inputs, "vtc_cls", keep=0.25)
    assert not handle.active
    handle.unpatch()  # idempotent
    vtc.patch(model, "fastv").unpatch()  # can be patched again


def test_patching_one_model_leaves_another_untouched(batch3):
    a, b = tiny_llava("llama", seed=5), tiny_llava("llama", seed=5)
    c = tiny_llava("qwen2", seed=5)
    lm_class_forward = type(a.model.language_model).forward
    inputs = batch3[2]
    with torch.no_grad():
        ref_b, ref_c = b(**inputs).logits, c(**inputs).logits
        hooks_b, hooks_c = hook_count(b), hook_count(c)
        with vtc.patched(a, "fastv", keep=0.25):
            assert torch.equal(b(**inputs).logits, ref_b)
            assert torch.equal(c(**inputs).logits, ref_c)
            assert hook_count(b) == hooks_b and hook_count(c) == hooks_c
            assert type(a.model.language_model).forward is lm_class_forward
            assert "forward" not in vars(b.model.language_model)


def test_text_only_input_passes_through(llava, processor):
    inputs = llava_inputs(processor, ["Where is the small object?", "How many?"])
    assert_text_only_passes_through(llava, inputs, "fastv", generate_tokens=5)


def test_multi_image_quota_per_image(llava, processor):
    """No image starves: each image of a multi-image prompt keeps its own budget."""
    inputs = llava_inputs(processor, ["Compare the pictures."], [[make_image(7), make_image(8), make_image(9)]])
    with torch.no_grad(), vtc.patched(llava, "vtc_cls", keep=4) as handle:
        llava(**inputs)
        kept = handle.last_kept()[0]
    assert len(kept) == 12
    assert [int(((kept >= 36 * i) & (kept < 36 * (i + 1))).sum()) for i in range(3)] == [4, 4, 4]
    assert handle.report().samples[0].images == [0, 1, 2]


def test_inputs_embeds_path(llava, single):
    """Prompts given as inputs_embeds (HF finds the image placeholders by their embedding) are pruned too."""
    embeds = llava.get_input_embeddings()(single["input_ids"])
    with torch.no_grad(), vtc.patched(llava, "fastv", keep=0.25) as handle:
        by_ids = llava(**single).logits
        kept = handle.last_kept()
        by_embeds = llava(
            inputs_embeds=embeds, pixel_values=single["pixel_values"], attention_mask=single["attention_mask"]
        ).logits
        assert torch.equal(handle.last_kept()[0], kept[0])
    assert (by_ids - by_embeds).abs().max() <= 1e-5
