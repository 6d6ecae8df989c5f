"""Decode-time KV policies (vtc/kv): budgets, kept entries, exactness, batches, composition, score oracles."""

import copy

import pytest
import torch
from torch.nn import functional as F

import vtc
from vtc.kv import list_policies
from vtc.testing import llava_inputs

from .helpers import hook_count, instance_attributes, until_eos

POLICIES = ["streaming", "h2o", "snapkv", "visual_aware"]
PAD = 1


def tiny_llm(backbone="llama", seed=0, attn_implementation="sdpa", layers=3):
    """A tiny random-weight text-only causal LM (GQA: 4 query heads, 2 KV heads)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    config, cls = {
        "llama": (lambda: LlamaConfig(**common), LlamaForCausalLM),
        "qwen2": (lambda: Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM),
        "mistral": (lambda: MistralConfig(**common, sliding_window=None), MistralForCausalLM),
    }[backbone]
    torch.manual_seed(seed)
    return cls._from_config(config(), attn_implementation=attn_implementation).eval()


def text_batch(lengths=(40, 29, 34), seed=0):
    """Left-padded batch of random prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), PAD)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, longest - n :] = torch.randint(3, 96, (n,), generator=g)
        mask[b, longest - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def alone(inputs, b):
    keep = inputs["attention_mask"][b].bool()
    return {k: v[b : b + 1, keep] for k, v in inputs.items()}


def generate(model, inputs, n):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD)
    return out[:, inputs["input_ids"].shape[1] :]


def record_lengths(policy):
    """Wrap the policy's after_* hooks: after every forward, per layer, (physical length, max valid entries
    per sample and KV head)."""
    log = []

    def wrap(name):
        original = getattr(policy, name)

        def hook(state):
            original(state)
            log.append(
                (
                    state.decoded,
                    [layer.keys.shape[2] for layer in state.cache.layers],
                    [int(v.sum(-1).max()) for v in state.layer_valid],
                )
            )

        setattr(policy, name, hook)

    wrap("after_prefill")
    wrap("after_decode")
    return log


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


@pytest.fixture(scope="module")
def batch():
    return text_batch()


@pytest.fixture(scope="module")
def reference(llm, batch):
    return generate(llm, batch, 6)


@pytest.fixture(scope="module")
def llava_reference(llava, batch3):
    with torch.no_grad():
        return llava.generate(**batch3[2], max_new_tokens=4, do_sample=False)


# --- budgets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", POLICIES)
def test_cache_never_exceeds_budget(kv, llm, batch):
    budget = 16
    with vtc.patched(llm, kv=kv, kv_budget=budget) as handle:
        log = record_lengths(handle.kv_policy)
        generate(llm, batch, 8)
        per_head = handle.kv_policy.per_head
        assert all(v.dim() == (3 if per_head else 2) for v in handle.adapter.decoder.state.layer_valid)
    assert len(log) == 8  # prefill + 7 decode steps
    for decoded, physical, valid in log:
        allowed = budget + decoded if kv == "snapkv" else budget  # SnapKV evicts at prefill only (its paper)
        assert max(physical) <= allowed and max(valid) <= allowed
        if kv == "snapkv":
            assert physical == [budget + decoded] * 3


def test_streaming_keeps_sinks_and_window_exactly(llm, batch):
    prompt = batch["attention_mask"].sum(1).tolist()
    with vtc.patched(llm, kv="streaming", kv_budget=14, kv_options={"sinks": 4}) as handle:
        policy = handle.kv_policy
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() passes them
        with torch.no_grad():
            llm(**batch, position_ids=positions, use_cache=True)
        for layer in range(3):
            assert policy.kept_positions(layer) == [[0, 1, 2, 3, *range(n - 10, n)] for n in prompt]
        generate(llm, batch, 7)  # 6 decode forwards: the last token is not fed back
        for layer in range(3):
            assert policy.kept_positions(layer) == [[0, 1, 2, 3, *range(n + 6 - 10, n + 6)] for n in prompt]
    assert [s.current for s in handle.report().kv.samples] == [[14] * 3] * 3


def test_h2o_keeps_window_and_heaviest(llm, batch):
    with vtc.patched(llm, kv="h2o", kv_budget=12, kv_options={"window": 5}) as handle:
        generate(llm, batch, 6)
        policy = handle.kv_policy
        n = batch["attention_mask"].sum(1) + 5
        for layer in range(3):
            for b, heads in enumerate(policy.kept_positions(layer)):
                for kept in heads:
                    assert len(kept) == 12 and kept[-5:] == list(range(int(n[b]) - 5, int(n[b])))


# --- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", POLICIES)
def test_budget_above_length_equals_unpatched(kv, llm, batch, reference):
    with vtc.patched(llm, kv=kv, kv_budget=64):
        assert torch.equal(generate(llm, batch, 6), reference)


@pytest.mark.parametrize("backbone", ["qwen2", "mistral"])
def test_other_text_backbones(backbone, batch):
    model = tiny_llm(backbone, seed=3)
    ref = generate(model, batch, 6)
    with vtc.patched(model, kv="streaming", kv_budget=64):
        assert torch.equal(generate(model, batch, 6), ref)


@pytest.mark.parametrize("kv", ["h2o", "visual_aware"])
def test_llava_budget_above_length_equals_unpatched(kv, llava, batch3, llava_reference):
    with torch.no_grad(), vtc.patched(llava, kv=kv, kv_budget=512):
        assert torch.equal(llava.generate(**batch3[2], max_new_tokens=4, do_sample=False), llava_reference)


@pytest.mark.parametrize("kv", POLICIES)
def test_batch_equals_each_sample_alone(kv, llm, batch):
    with vtc.patched(llm, kv=kv, kv_budget=14) as handle:
        gen = generate(llm, batch, 6)
        kept = [handle.kv_policy.kept_positions(layer) for layer in range(3)]
        for b in (1, 2):  # padded samples
            assert generate(llm, alone(batch, b), 6)[0].tolist() == gen[b].tolist()
            assert [handle.kv_policy.kept_positions(layer)[0] for layer in range(3)] == [k[b] for k in kept]


@pytest.mark.parametrize("kv", ["visual_aware"])
def test_llava_batch_equals_each_sample_alone(kv, llava, processor, batch3):
    questions, images, inputs = batch3
    eos = llava.config.text_config.eos_token_id
    with torch.no_grad(), vtc.patched(llava, "fastv", keep=0.5, kv=kv, kv_budget=24) as handle:
        gen = llava.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        kept = handle.kv_policy.kept_positions(3)
        for b in (0, 2):  # the shortest prompt, and the one with two images
            one = llava_inputs(processor, [questions[b]], [images[b]])
            gen_b = llava.generate(**one, max_new_tokens=5, do_sample=False)[:, one["input_ids"].shape[1] :]
            assert until_eos(gen[b : b + 1], eos) == until_eos(gen_b, eos)
            assert handle.kv_policy.kept_positions(3)[0] == kept[b]


# --- composition with a visual strategy ------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy,kv,options",
    [("fastv", "snapkv", {}), ("vtc_cls", "visual_aware", {"visual_budget": 6}), ("fastv", "h2o", {})],
)
def test_composed_reports_add_up(strategy, kv, options, llava, batch3):
    inputs = batch3[2]
    budget = 30
    with torch.no_grad(), vtc.patched(llava, strategy, keep=0.5, kv=kv, kv_budget=budget, kv_options=options) as h:
        llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        report = h.report()
    assert report.kv is not None and "KV policy" in str(report) and report.to_dict()["kv"]["policy"]
    for visual, cache in zip(report.samples, report.kv.samples):
        assert cache.prompt_entries == visual.tokens_per_layer  # what the strategy left is what got cached
        if kv == "visual_aware":  # separate budgets: min(6, visual) + text up to the rest
            vis = [min(6, v) for v in visual.visual_per_layer]
            text = [n - v for n, v in zip(visual.tokens_per_layer, visual.visual_per_layer)]
            assert cache.kept_after_prefill == [v + min(budget - v, t) for v, t in zip(vis, text)]
            assert cache.visual_after_prefill == vis
        else:
            assert cache.kept_after_prefill == [min(budget, n) for n in visual.tokens_per_layer]
        assert all(k <= v for k, v in zip(cache.visual_after_prefill, visual.visual_per_layer))
        assert cache.decoded == 3
        if kv != "visual_aware":
            assert cache.current == [min(budget, n) + 3 if kv == "snapkv" else budget for n in visual.tokens_per_layer]
    assert report.samples[0].visual_per_layer != [36] * 4 or strategy == "vtc_cls"


def test_visual_aware_separates_budgets(llava, single):
    with torch.no_grad(), vtc.patched(llava, kv="visual_aware", kv_budget=20, kv_options={"visual_budget": 8}) as h:
        llava.generate(**single, max_new_tokens=6, do_sample=False)
        policy, state = h.kv_policy, h.adapter.decoder.state
        for layer in range(4):
            visual = policy.meta[layer]["visual"] & state.layer_valid[layer]
            text = ~policy.meta[layer]["visual"] & state.layer_valid[layer]
            assert (visual.sum(-1) == 8).all() and (text.sum(-1) == 12).all()
            text_positions = [0, 1, *range(38, 53)]  # "USER:", 36 image tokens, 10 text, 5 fed back
            for head in policy.kept_positions(layer)[0]:
                assert [p for p in head if p in text_positions] == text_positions[:4] + text_positions[-8:]


# --- scores equal an oracle from eager attention of an unpatched copy -------------------------------
def eager_attentions(model, input_ids):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return eager(input_ids=input_ids, output_attentions=True, use_cache=False).attentions


def per_kv_head(attn, kv_heads=2):
    b, heads, n = attn.shape[:3]
    return attn.view(b, kv_heads, heads // kv_heads, *attn.shape[2:]).mean(2)


def test_h2o_scores_equal_oracle(llm):
    ids = text_batch((30,))["input_ids"]
    with vtc.patched(llm, kv="h2o", kv_budget=64) as handle:  # budget above the length: nothing evicted
        gen = generate(llm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 6)
        scores = [handle.kv_policy.meta[layer]["score"] for layer in range(3)]
        prefill = dict(handle.kv_policy.prefill_scores)
    full = torch.cat([ids, gen[:, :-1]], dim=1)  # the prompt and the 5 tokens fed back
    attentions = eager_attentions(llm, full)
    for layer in range(3):
        oracle = per_kv_head(attentions[layer]).sum(2)  # (B, kv_heads, T): summed over every query so far
        assert (scores[layer] - oracle).abs().max() <= 1e-4
        oracle_prefill = per_kv_head(eager_attentions(llm, ids)[layer]).sum(2)
        assert (prefill[layer] - oracle_prefill).abs().max() <= 1e-4


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_votes_and_selection_equal_oracle(pooling, llm):
    ids = text_batch((40,), seed=5)["input_ids"]
    budget, window = 20, 8
    options = {"window": window, "pooling": pooling}
    attentions = eager_attentions(llm, ids)
    with vtc.patched(llm, kv="snapkv", kv_budget=budget, kv_options=options) as handle:
        with torch.no_grad():
            llm(input_ids=ids, use_cache=True)
        policy = handle.kv_policy
        for layer in range(3):
            votes = per_kv_head(attentions[layer][:, :, -window:, :-window]).sum(2)
            pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
            votes = pool(votes, kernel_size=7, padding=3, stride=1)
            assert (policy.prefill_scores[layer][..., :-window] - votes).abs().max() <= 1e-5
            top = votes.topk(budget - window, dim=-1).values  # max pooling ties: compare the kept votes
            for h, kept in enumerate(policy.kept_positions(layer)[0]):
                assert kept[-window:] == list(range(40 - window, 40))
                chosen = votes[0, h, kept[:-window]].sort(descending=True).values
                assert torch.allclose(chosen, top[0, h], atol=1e-6)


# --- API: errors, unpatch -------------------------------------------------------------------------
def test_bad_kv_arguments_fail_early_and_leave_model_unpatched(llm):
    lm = llm.model
    cases = [
        (dict(kv="snap"), "known: " + ", ".join(list_policies())),
        (dict(kv="snapkv"), "kv_budget"),
        (dict(kv="streaming", kv_budget=0), "positive int"),
        (dict(kv="streaming", kv_budget=2.5), "positive int"),
        (dict(kv="streaming", kv_budget=4), "sinks"),
        (dict(kv="h2o", kv_budget=8, kv_options={"window": 9}), "window"),
        (dict(kv="snapkv", kv_budget=8, kv_options={"kernel_size": 4}), "odd"),
        (dict(kv="snapkv", kv_budget=8, kv_options={"pooling": "median"}), "avg, max"),
        (dict(kv="streaming", kv_budget=8, kv_options={"window": 2}), "no option window"),
        (dict(kv_budget=8), "without a KV policy"),
        (dict(strategy="fastv", kv="streaming", kv_budget=8), "text-only language model"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            vtc.patch(llm, **kwargs)
        assert "forward" not in vars(lm)
    assert vtc.kv.get_policy_class("StreamingLLM").name == "streaming"


def test_unpatch_restores_text_llm_exactly(batch):
    model = tiny_llm(seed=7)
    with torch.no_grad():
        ref = model(**batch).logits
    hooks, attrs = hook_count(model), instance_attributes(model)
    handle = vtc.patch(model, kv="h2o", kv_budget=8)
    assert "h2o" in repr(handle)
    generate(model, batch, 4)
    handle.unpatch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)
    assert hook_count(model) == hooks and instance_attributes(model) == attrs


def test_kv_policy_instance(llm, batch):
    policy = vtc.kv.StreamingLLM(10, sinks=2)
    with vtc.patched(llm, kv=policy) as handle:
        generate(llm, batch, 3)
        assert handle.kv_policy is policy
        assert max(handle.report().kv.samples[0].current) == 10
