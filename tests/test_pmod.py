"""p-MoD (layer routing of visual tokens): the schedule, TanhNorm, a hand-built routed layer, the per-layer
KV absence at decode, batching, training the routers, weights, the announced fallback, unpatch."""

import math
import warnings

import pytest
import torch

import vtc
from vtc.data import make_scene_qa
from vtc.strategies.pmod import PMoD, make_routers, mean_retention, schedule, schedule_for_keep, tanh_norm
from vtc.testing import llava_inputs, tiny_llava

from .helpers import (
    announced_fallback_report,
    assert_restored,
    full_embeds,
    greedy_recompute,
    restore_snapshot,
    saved_weights_logits,
    until_eos,
    upper_layers,
)

N_LAYERS = 4  # tiny_llava's decoder
HIDDEN = 64


def random_routers(layers, seed: int = 0, std: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    routers = make_routers(HIDDEN, layers)
    for router in routers.values():
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * std)
            router.bias.copy_(torch.randn(1, generator=generator) * std)
    return routers.requires_grad_(False)


def routed(routers, ratios=None):
    strategy = PMoD.with_routers(routers)
    strategy.fixed_ratios = ratios
    return strategy


@pytest.fixture(scope="module")
def hidden(llava):
    assert llava.config.text_config.hidden_size == HIDDEN
    return HIDDEN


# --- schedule and weights --------------------------------------------------------------------------------
def test_schedule_32_layers_by_hand():
    ratios = schedule(32)
    assert sorted(ratios) == list(range(8, 32))  # rho_7 = 0.5 cos(7 pi / 31) + 0.5 = 0.8794 > 0.85
    assert ratios[8] == pytest.approx(0.84448, abs=1e-5)  # 0.5 cos(8 * 180 deg / 31) + 0.5
    assert ratios[16] == pytest.approx(0.47468, abs=1e-5)
    assert ratios[23] == pytest.approx(0.15552, abs=1e-5)
    assert ratios[24] == ratios[31] == 0.15  # 0.12 and 0.0 floored at 0.15
    for layer, ratio in ratios.items():
        assert ratio == max(0.15, 0.5 * math.cos(layer * math.pi / 31) + 0.5)
    assert mean_retention(ratios, 32) == pytest.approx(0.5375, abs=1e-4)  # the paper's ~54%


def test_schedule_tiny_and_keep():
    assert schedule(4) == pytest.approx({1: 0.75, 2: 0.25, 3: 0.15})  # cos(pi/3) = 0.5, cos(2 pi/3) = -0.5
    assert schedule(2) == {1: 0.15}
    assert schedule_for_keep(1.0, 4) == {}  # keep=1: no layer routes
    means = []
    for keep in (0.1, 0.25, 0.5, 0.8):
        ratios = schedule_for_keep(keep, 4)
        means.append(mean_retention(ratios, 4))
        assert keep - 1e-9 <= means[-1] <= keep + 0.15 / 4 + 1e-9  # reaches keep, overshoots by one jump at most
    assert means == sorted(means)
    assert min(schedule_for_keep(0.1, 4).values()) == pytest.approx(0.1)  # floor lowered to a keep below it


def test_zero_initialised_routers_give_w_one_exactly():
    routers = make_routers(HIDDEN, [1, 2])
    x = torch.randn(3, 7, HIDDEN) * 10
    for router in routers.values():
        w = tanh_norm(router(x).squeeze(-1))
        assert torch.equal(w, torch.ones_like(w))
    assert torch.equal(tanh_norm(torch.tensor([1e4, -1e4])), torch.tensor([1.2, 0.8]))


def test_bad_options_fail_early(llava, tmp_path):
    with pytest.raises(ValueError, match="token count.*float"):
        vtc.patch(llava, "pmod", keep=5)
    with pytest.raises(FileNotFoundError, match="pmod weights not found.*vtc.train"):
        vtc.patch(llava, "pmod", weights=tmp_path / "missing.safetensors")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="layers \\[7\\].*4 layers"):
        vtc.patch(llava, "pmod", ratios={7: 0.5})
    with pytest.raises(ValueError, match="no router for routed layers \\[1, 2\\]"):
        vtc.patch(llava, PMoD.with_routers(make_routers(HIDDEN, [3])))
    assert "forward" not in vars(llava.model.language_model)


# --- invariants -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone,attn", [("llama", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa")])
def test_ratio_one_everywhere_is_identity(backbone, attn, batch3):
    """Every layer routed at ratio 1 with zero-initialised routers (w = 1), and keep=1 (no layer routed):
    the unpatched logits."""
    model = tiny_llava(backbone, seed=1, attn_implementation=attn)
    inputs = batch3[2]
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        strategy = routed(make_routers(HIDDEN, [0, 1, 2, 3]), {layer: 1.0 for layer in range(N_LAYERS)})
        with vtc.patched(model, strategy) as handle:
            out = model(**inputs).logits
            assert [s.visual_per_layer for s in handle.report().samples] == [[36] * 4, [36] * 4, [72] * 4]
        assert (out - ref)[valid].abs().max() <= 1e-5
        with pytest.warns(UserWarning, match="fallback"), vtc.patched(model, "pmod", keep=1.0):
            assert (model(**inputs).logits - ref)[valid].abs().max() <= 1e-5


def test_one_routed_layer_equals_hand_built_oracle(llava, single):
    """Layer 2 routed at ratio 0.5 with random routers, run by hand: the top 18 of 36 visual tokens by w and
    the text go through the layer (x + Attn + w * MLP), the others leave as w * x; layers 3.. are HF's own."""
    layer_index, ratio = 2, 0.5
    routers = random_routers([layer_index], seed=3)
    lm = llava.model.language_model
    with torch.no_grad():
        ref = llava(**single, output_hidden_states=True)
        with vtc.patched(llava, routed(routers, {layer_index: ratio})) as handle:
            out = llava(**single, use_cache=True)
            report = handle.report()
        _, visual = full_embeds(llava, single)
        visual = visual[0]
        x = ref.hidden_states[layer_index][0]  # the input of layer 2 (layers 0, 1 are not routed)
        w = 0.2 * torch.tanh(routers[str(layer_index)](x).squeeze(-1)) + 1
        vis_rows = visual.nonzero().squeeze(1)
        k = math.floor(len(vis_rows) * ratio)
        chosen = vis_rows[torch.sort(w[vis_rows], descending=True, stable=True).indices[:k]]
        run = ~visual
        run[chosen] = True
        rows = run.nonzero().squeeze(1)
        layer = lm.layers[layer_index]
        sub = x[rows][None]
        cos, sin = lm.rotary_emb(sub, rows[None])
        causal = torch.ones(len(rows), len(rows), dtype=torch.bool).tril()[None, None]
        attn, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(sub), position_embeddings=(cos, sin), attention_mask=causal
        )
        mid = sub + attn
        w_sub = torch.where(visual[rows], w[rows], torch.ones_like(w[rows]))
        layer_out = mid + w_sub[None, :, None] * layer.mlp(layer.post_attention_layernorm(mid))
        after = torch.where(visual[:, None], w[:, None] * x, x)
        after[rows] = layer_out[0]
        upper = upper_layers(lm, layer_index + 1)
        hidden = upper(
            inputs_embeds=after[None],
            position_ids=torch.arange(len(x))[None],
            attention_mask=torch.ones(1, len(x), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        oracle = llava.lm_head(hidden)
    assert (out.logits - oracle).abs().max() <= 1e-5
    assert report.samples[0].visual_per_layer == [36, 36, 18, 36]
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [len(x), len(x), len(rows), len(x)]  # the skipped tokens are absent from layer 2's cache


@pytest.mark.parametrize("mode", ["fallback", "routers"])
def test_generate_with_cache_equals_recompute(llava, batch3, mode):
    inputs = batch3[2]
    eos = llava.config.text_config.eos_token_id
    prompt = inputs["input_ids"].shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = PMoD() if mode == "fallback" else routed(random_routers([1, 2, 3], seed=1))
    with torch.no_grad(), vtc.patched(llava, strategy) as handle:
        cached = llava.generate(**inputs, max_new_tokens=6, do_sample=False)[:, prompt:]
        state = llava.model.language_model.forward.__self__.state
        assert [v.shape[-1] for v in state.layer_valid[1:]] == [
            layer.keys.shape[-2] for layer in state.cache.layers[1:]
        ]
        assert len({v.shape[-1] for v in state.layer_valid}) == N_LAYERS  # each layer caches its own subset
        handle.reuse_selection = True
        recomputed = greedy_recompute(llava, inputs, 6)
    assert until_eos(cached, eos) == until_eos(recomputed, eos)


@pytest.mark.parametrize("mode", ["fallback", "routers"])
def test_batch_equals_each_sample_alone(llava, processor, batch3, mode):
    questions, images, inputs = batch3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = PMoD() if mode == "fallback" else routed(random_routers([1, 2, 3], seed=2))
    with torch.no_grad(), vtc.patched(llava, strategy) as handle:
        out = llava(**inputs).logits
        samples = handle.report().samples
        gen = llava.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        for b in range(3):
            alone = llava_inputs(processor, [questions[b]], [images[b]])
            out_b = llava(**alone).logits
            assert handle.report().samples[0].visual_per_layer == samples[b].visual_per_layer
            assert (out[b, -out_b.shape[1] :] - out_b[0]).abs().max() <= 1e-5
            gen_b = llava.generate(**alone, max_new_tokens=5, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert gen[b].tolist() == gen_b[0].tolist()
    n = [36, 36, 72]
    assert [s.visual_per_layer for s in samples] == [[v, int(v * 0.75), int(v * 0.25), int(v * 0.15)] for v in n]


def test_composes_after_a_pre_llm_strategy(llava, batch3):
    inputs = batch3[2]
    with pytest.warns(UserWarning, match="pmod without trained"), torch.no_grad():
        with vtc.patched(llava, ["vtc_cls", "pmod"], keep=0.5) as handle:
            llava(**inputs)
            samples = handle.report().samples
    assert [s.visual_per_layer for s in samples] == [[18, 13, 4, 2], [18, 13, 4, 2], [36, 27, 9, 5]]


# --- training, weights, fallback, unpatch ---------------------------------------------------------------
def test_training_lowers_loss_with_the_vlm_frozen(llava, processor):
    """Layers 1, 2 compute every visual token (w scales their MLP), layer 3 none (each leaves as w * x): no
    top-k choice flips between steps, so the answer loss must fall step after step through w alone."""
    before = {k: v.clone() for k, v in llava.state_dict().items()}
    flags = {k: p.requires_grad for k, p in llava.named_parameters()}
    result = vtc.train(
        llava,
        "pmod",
        data=make_scene_qa(2, 0),
        processor=processor,
        steps=5,
        lr=0.05,
        batch_size=2,
        ratios={1: 1.0, 2: 1.0, 3: 0.0},
        progress=False,
    )
    assert all(b < a for a, b in zip(result.losses, result.losses[1:])), result.losses
    assert all(torch.equal(v, before[k]) for k, v in llava.state_dict().items())  # the VLM stayed frozen
    assert {k: p.requires_grad for k, p in llava.named_parameters()} == flags
    assert "forward" not in vars(llava.model.language_model)  # train unpatched the model


def test_trained_weights_save_and_load(llava, processor, tmp_path):
    path = tmp_path / "pmod.safetensors"
    data = make_scene_qa(2, 1)
    result = vtc.train(
        llava, "pmod", data=data, processor=processor, steps=2, lr=0.05, batch_size=2, save=path, progress=False
    )
    assert path.is_file() and result.path == path
    routers = result.strategy.routers
    assert sorted(int(k) for k in routers) == sorted(schedule(N_LAYERS)) == [1, 2, 3]
    assert all(routers[str(layer)].weight.abs().sum() > 0 for layer in (1, 2))
    # a visual token's output of the LAST layer reaches only its own logits (no loss there): w of that layer
    # gets no gradient and its router keeps its zero init (the same holds in the official code)
    assert routers["3"].weight.abs().sum() == 0

    inputs = llava_inputs(processor, [data[0]["question"]], [[data[0]["image"]]])
    loaded, report = saved_weights_logits(llava, inputs, "pmod", path, result.strategy)  # == the trained strategy
    assert not any("fallback" in n for n in report.notes) and "FALLBACK" not in report.strategy
    with torch.no_grad(), vtc.patched(llava, PMoD.with_routers(make_routers(HIDDEN, [1, 2, 3]))):
        untrained = llava(**inputs).logits
    assert not torch.equal(loaded, untrained)


def test_fallback_is_announced(llava, batch3):
    report = announced_fallback_report(llava, batch3[2], "pmod", "pmod without trained router weights.*fallback")
    assert "FALLBACK" in report.strategy and "note: pmod without trained router weights" in str(report)
    assert all(s.visual_per_layer[-1] < s.visual_in and s.flops_ratio < 1 for s in report.samples)


def test_unpatch_restores_exactly(batch3):
    model = tiny_llava("llama", seed=4)
    inputs = batch3[2]
    before = restore_snapshot(model, inputs)
    with torch.no_grad():
        handle = vtc.patch(model, routed(random_routers([1, 2, 3], seed=5)))
        patched = model(**inputs).logits
        assert (patched - before["logits"]).abs().max() > 1e-3  # routing changed something
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        handle.unpatch()
    assert_restored(model, inputs, before)
