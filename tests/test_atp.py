"""ATP (Ye et al., ATP-LLaVA, CVPR 2025): redundancy score vs an eager-attention oracle, the stride grid,
the announced fallback's budgets, ragged learned thresholds, generate, training, weights, identity, unpatch."""

import warnings

import pytest
import torch

import vtc
from vtc.data import make_scene_qa
from vtc.strategies.atp import ATP, grid_mask, make_modules, schedule
from vtc.testing import llava_inputs, tiny_llava
from vtc.testing.llava_next import next_inputs, tiny_llava_next, tiny_llava_next_processor
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl
from vtc.train.atp import _soft_mask_hook

from .helpers import (
    announced_fallback_report,
    assert_cached_generate_equals_recompute,
    assert_keep_one_is_identity,
    hook_count,
    instance_attributes,
    saved_weights_logits,
    until_eos,
)

N_LAYERS = 4  # tiny_llava's decoder; ATP modules before layers 1, 2, 3 (the paper's 4, 14, 24 of 32, scaled)
GRID = (6, 6)  # tiny_llava's token grid per image


def _fallback(**options) -> ATP:
    with pytest.warns(UserWarning, match="atp without trained threshold weights.*fallback"):
        return ATP(**options)


def _learned(llava, seed: int = 0, bias: float | None = None) -> ATP:
    modules = make_modules(llava.config.text_config.hidden_size, 3, seed=seed)
    if bias is not None:
        for module in modules:
            module.fc2.bias.data.fill_(bias)
    return ATP.with_modules(modules, [1, 2, 3])


def _capture(strategy: ATP) -> dict:
    """Record, per stage and image, the redundancy scores the strategy saw."""
    seen, select = {}, strategy.select

    def wrapped(visual):
        out = select(visual)
        data = strategy._stage(visual)
        for row, image in enumerate(visual.image_index.tolist()):
            seen[(visual.stage, image)] = data["score"][visual.context["rows"][row]].clone()
        return out

    strategy.select = wrapped
    return seen


@pytest.mark.parametrize("layer", [1, 2])
def test_redundancy_score_matches_eager_attention_oracle(single, layer):
    """At the first module (nothing pruned before), the score equals the one built from the eager model's
    attention map of the layer before: mean of the normalised self (visual queries) and cross (text after
    the image) attention each visual token receives."""
    eager = tiny_llava("llama", seed=0, attn_implementation="eager")
    ids = single["input_ids"][0]
    with torch.no_grad():
        attn = eager(**single, output_attentions=True).attentions[layer - 1][0].mean(0)  # (L, L), oracle only
    vis = (ids == eager.config.image_token_id).nonzero().squeeze(1)
    text = torch.arange(len(ids))[(torch.arange(len(ids)) > vis.max()) & (ids != eager.config.image_token_id)]
    block = attn[vis][:, vis]  # queries x keys, zero above the diagonal (causal)
    raw_self = block.sum(0) / torch.arange(len(vis), 0, -1)  # mean over the queries at or after each key
    raw_cross = attn[text][:, vis].mean(0)
    oracle = len(vis) * (raw_self / raw_self.sum() + raw_cross / raw_cross.sum()) / 2

    strategy = _fallback(layers=[layer])
    seen = _capture(strategy)
    with torch.no_grad(), vtc.patched(eager, strategy):
        eager(**single)
    assert torch.allclose(seen[(layer, 0)], oracle, atol=1e-5, rtol=1e-4)
    assert abs(float(oracle.mean()) - 1.0) < 1e-5  # the scale: mean 1 over the image's tokens


def test_stride_grid_always_kept(llava, batch3):
    inputs = batch3[2]
    grid = grid_mask(torch.arange(36)[None], GRID, 2)[0].nonzero().squeeze(1)
    # learned thresholds far above every score: exactly the grid survives every module
    with torch.no_grad(), vtc.patched(llava, _learned(llava, bias=50.0)) as handle:
        llava(**inputs)
        selections = handle._last["selections"]
    for stage in (1, 2, 3):
        for image in range(4):
            assert torch.equal(selections[stage][image][0].cpu(), grid)
    # fallback at keep=0.5: the grid is a subset of what every module keeps
    with torch.no_grad(), vtc.patched(llava, _fallback(keep=0.5)) as handle:
        llava(**inputs)
        selections = handle._last["selections"]
    for stage in (1, 2, 3):
        for image in range(4):
            kept = set(selections[stage][image][0].tolist())
            assert set(grid.tolist()) <= kept and len(kept) > len(grid)


@pytest.mark.parametrize("keep,final", [(0.25, 9), (0.5, 18), (5, 5), (0.1, 4)])
def test_fallback_budgets_realised(llava, batch3, keep, final):
    inputs = batch3[2]
    counts = schedule(36, final, 3)
    assert counts[-1] == final and counts == sorted(counts, reverse=True)
    with torch.no_grad(), vtc.patched(llava, _fallback(keep=keep)) as handle:
        llava(**inputs)
        report = handle.report()
        selections = handle._last["selections"]
    images = [1, 1, 2]
    for sample, n_images in zip(report.samples, images):
        assert sample.visual_per_layer == [36 * n_images] + [c * n_images for c in counts]
    if keep == 0.1:  # 9 grid tokens > 4: the grid stride grows to 3 (4 tokens), all of them kept
        grid3 = grid_mask(torch.arange(36)[None], GRID, 3)[0].nonzero().squeeze(1)
        assert torch.equal(selections[3][0][0].cpu(), grid3)


def test_composition_schedules_from_what_enters(llava, batch3):
    strategy = ["visionzip", ("atp", {"keep": 0.5})]
    report = announced_fallback_report(llava, batch3[2], strategy, "atp without trained", keep=0.5)
    per_layer = [s.visual_per_layer for s in report.samples]
    assert per_layer == [[18, 14, 11, 9], [18, 14, 11, 9], [36, 28, 22, 18]]  # schedule(18, 9, 3) per image


def test_fallback_is_announced(llava, batch3):
    report = announced_fallback_report(llava, batch3[2], "atp", "atp without trained threshold weights")
    assert "FALLBACK" in report.strategy and "note: atp without trained threshold weights" in str(report)


@pytest.fixture(scope="module")
def ragged(llava, batch3):
    """Learned (seeded, untrained) thresholds under which the images of batch3 keep different counts."""
    strategy = _learned(llava)
    with torch.no_grad(), vtc.patched(llava, strategy) as handle:
        llava(**batch3[2])
        finals = [s.visual_per_layer[-1] for s in handle.report().samples]
    assert len(set(finals)) > 1, finals
    return strategy


def test_ragged_batch_equals_per_sample_runs(llava, processor, batch3, ragged):
    questions, images, inputs = batch3
    with torch.no_grad(), vtc.patched(llava, ragged) as handle:
        batch_logits = llava(**inputs).logits
        samples = handle.report().samples
        for b, sample in enumerate(samples):
            alone = llava(**llava_inputs(processor, [questions[b]], [images[b]])).logits[0]
            assert handle.report().samples[0].visual_per_layer == sample.visual_per_layer
            assert (batch_logits[b, -alone.shape[0] :] - alone).abs().max() <= 1e-4
    per_layer = [s.visual_per_layer for s in samples]
    assert all(layers == sorted(layers, reverse=True) for layers in per_layer)


@pytest.mark.parametrize("kind", ["learned", "fallback"])
def test_generate_with_cache_equals_recompute(llava, batch3, ragged, kind):
    strategy = ragged if kind == "learned" else _fallback()
    assert_cached_generate_equals_recompute(llava, batch3[2], strategy, 3)


def test_soft_masks_act_in_the_model_and_harden_to_pruning(llava, single):
    """Training's soft masks (log-mask on the visual keys of deeper layers) at a huge temperature give the
    text-token logits of the hard-pruned inference run with the same thresholds."""
    hard = _learned(llava, seed=1)
    with torch.no_grad(), vtc.patched(llava, hard) as handle:
        pruned = llava(**single).logits[0]
        kept = handle.last_kept()[0]
    counts = handle.report().samples[0].visual_per_layer
    assert counts[-1] < counts[0]
    soft = ATP.for_training(hard.modules, 0.25, [1, 2, 3], temperature=1e4)
    with torch.no_grad(), vtc.patched(llava, soft) as handle:
        hooks = [llava.model.language_model.layers[i].register_forward_pre_hook(_soft_mask_hook(soft), with_kwargs=True)
                 for i in range(1, N_LAYERS)]
        try:
            full = llava(**single).logits[0]
        finally:
            for hook in hooks:
                hook.remove()
    ids = single["input_ids"][0]
    is_vis = ids == llava.config.image_token_id
    keep = ~is_vis
    keep[is_vis.nonzero().squeeze(1)[kept]] = True
    text_in_pruned = ~is_vis[keep]
    assert full.shape[0] == len(ids) and pruned.shape[0] == int(keep.sum())
    assert (full[~is_vis] - pruned[text_in_pruned]).abs().max() <= 1e-4
    soft_counts = [int(count.round()) for _, _, counts_j, _ in soft._kept for count in counts_j]
    assert soft_counts == counts[1:]


def test_training_lowers_loss_saves_and_loads(llava, processor, single, tmp_path):
    before = {k: v.clone() for k, v in llava.state_dict().items()}
    hooks = hook_count(llava)
    path = tmp_path / "atp.safetensors"
    result = vtc.train(
        llava, "atp", data=make_scene_qa(2, 0), processor=processor, steps=6, lr=3e-3, batch_size=2,
        save=path, progress=False,
    )
    assert result.losses[-1] < result.losses[0] and result.answer_losses[-1] < result.answer_losses[0]
    assert abs(result.kept_fraction[-1] - result.target) < 0.02  # the budget loss pulled the soft count in
    assert result.path == path and path.is_file()
    assert all(torch.equal(v, before[k]) for k, v in llava.state_dict().items())  # the VLM stayed frozen
    assert all(p.requires_grad for p in llava.parameters()) and hook_count(llava) == hooks
    assert "forward" not in vars(llava.model.language_model)
    _, report = saved_weights_logits(llava, single, "atp", path, result.strategy)  # == the trained strategy
    assert not report.notes and "thresholds=" in report.strategy


def test_weights_errors(llava, tmp_path):
    with pytest.raises(FileNotFoundError, match="atp weights not found.*vtc.train"):
        vtc.patch(llava, "atp", weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="atp layers"):
        with pytest.warns(UserWarning):
            vtc.patch(llava, "atp", layers=[2, 9])
    assert "forward" not in vars(llava.model.language_model)


@pytest.mark.parametrize("kind", ["fallback", "learned"])
def test_keep_one_is_identity(llava, batch3, kind):
    if kind == "fallback":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_keep_one_is_identity(llava, batch3[2], "atp")
        return
    strategy = _learned(llava)
    strategy.keep = 1.0
    with torch.no_grad():
        ref = llava(**batch3[2]).logits
        with vtc.patched(llava, strategy):
            out = llava(**batch3[2]).logits
    assert (out - ref)[batch3[2]["attention_mask"].bool()].abs().max() <= 1e-5


def test_unpatch_is_exact(llava, batch3, ragged):
    inputs = batch3[2]
    attributes, hooks = instance_attributes(llava), hook_count(llava)
    with torch.no_grad():
        ref = llava(**inputs).logits
        with vtc.patched(llava, ragged):
            llava(**inputs)
        assert torch.equal(llava(**inputs).logits, ref)
    assert instance_attributes(llava) == attributes and hook_count(llava) == hooks


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_learned_thresholds_on_other_adapters(family, processor):
    """Crops (LLaVA-NeXT) and M-RoPE (Qwen2-VL): ragged learned selections, a batch equals its samples run
    alone, and generate with the cache equals recomputing from the same selection."""
    from vtc.testing import make_image
    from vtc.testing.llava_next import make_wide_image

    questions = ["What is in the image?", "How many objects are there? Answer with one word."]
    if family == "llava_next":
        model, proc = tiny_llava_next("llama", seed=22), tiny_llava_next_processor()
        images = [[make_wide_image(0)], [make_image(1)]]

        def encode(qs, ims):
            return next_inputs(proc, qs, ims)
    else:
        model, proc = tiny_qwen_vl("qwen2_vl", seed=24), tiny_qwen_processor()
        images = [[make_image(0, size=84)], [make_image(1, size=112)]]

        def encode(qs, ims):
            return qwen_inputs(proc, qs, images=ims)

    inputs = dict(encode(questions, images))
    strategy = ATP.with_modules(make_modules(model.config.get_text_config().hidden_size, 3, seed=0), [1, 2, 3])
    eos = model.config.get_text_config().eos_token_id
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtc.patched(model, strategy) as handle:
        batch_logits = model(**inputs).logits
        per_layer = [s.visual_per_layer for s in handle.report().samples]
        for b in range(2):
            alone = model(**encode([questions[b]], [images[b]])).logits[0]
            assert handle.report().samples[0].visual_per_layer == per_layer[b]
            assert (batch_logits[b, -alone.shape[0] :] - alone).abs().max() <= 1e-4
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, prompt:]
        handle.reuse_selection = True
        recomputed = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)[:, prompt:]
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
    assert all(layers[-1] < layers[0] for layers in per_layer)
