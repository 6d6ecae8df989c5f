"""Public API: names, errors that name the fix, and the model left unpatched after any error."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtc
from vtc.budget import prefill_flops, tokens_to_keep
from vtc.strategies.base import top_k_sorted

from .helpers import hook_count


def assert_unpatched(model):
    assert "forward" not in vars(model.model.language_model)
    assert not vtc.api._ACTIVE.get(model)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(strategy="nope"), ValueError, "unknown strategy 'nope'; known strategies: "),
        (dict(strategy="fastv", keep=0), ValueError, "pass a fraction in (0, 1]"),
        (dict(strategy="fastv", keep=0.0), ValueError, "must lie in (0, 1]"),
        (dict(strategy="fastv", keep=1.5), ValueError, "must lie in (0, 1]"),
        (dict(strategy="fastv", keep=-3), ValueError, "token count per image >= 1"),
        (dict(strategy="vtc_cls", keep=37), ValueError, "above the 36 visual tokens per image"),
        (dict(strategy="fastv", keep="half"), TypeError, "keep must be a float"),
        (dict(strategy="fastv", keep=True), TypeError, "keep must be a float"),
        (dict(strategy="fastv", layer=4), ValueError, "pass a layer in [1, 3]"),
        (dict(strategy="fastv", layer=0), ValueError, "pass a layer in [1, 3]"),
        (dict(strategy="fastv", queries="all"), ValueError, "queries must be"),
        (dict(strategy="fopru", mode="cols"), ValueError, "mode must be"),
        (dict(strategy="vtc_cls", start_layer=9), ValueError, "pass start_layer in [0, 2]"),
        (dict(strategy="fastv", window=3), TypeError, "options of strategy 'fastv': layer, queries"),
    ],
)
def test_bad_input_fails_early_and_leaves_model_unpatched(llava, kwargs, error, message):
    hooks = hook_count(llava)
    with pytest.raises(error) as info:
        vtc.patch(llava, **kwargs)
    assert message in str(info.value)
    if "known strategies" in message:
        assert ", ".join(vtc.list_strategies()) in str(info.value)
    assert hook_count(llava) == hooks
    assert_unpatched(llava)


def test_unsupported_model_lists_supported_ones():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
    )
    with pytest.raises(TypeError, match="no adapter for CLIPVisionModel; supported model classes: .*LlavaForCond"):
        vtc.patch(model, "fastv")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_visual_strategy_on_a_text_only_llm_names_the_fix():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="text-only language model.*kv='streaming'"):
        vtc.patch(model, "fastv")
    assert "forward" not in vars(model.model)


def test_int_keep_above_count_at_run_time_names_the_fix():
    """An int keep is also checked against the image actually seen (e.g. fewer tokens than the config says)."""
    with pytest.raises(ValueError, match="above the 36 visual tokens of this image"):
        tokens_to_keep(40, 36)


def test_double_patch_is_refused(llava):
    with vtc.patched(llava, "fastv"):
        with pytest.raises(RuntimeError, match="already patched"):
            vtc.patch(llava, "vtc_cls")
    assert_unpatched(llava)


def test_context_manager_unpatches_after_error(llava):
    with pytest.raises(KeyError):
        with vtc.patched(llava, "fastv"):
            raise KeyError("boom")
    assert_unpatched(llava)


def test_names_resolve_and_defaults(llava):
    assert {"fastv", "fopru", "vtc_cls", "none"} <= set(vtc.list_strategies())
    for spelling in ("VTC-CLS", "vtc_cls", "VtcCls", "vtc-cls"):
        with vtc.patched(llava, spelling) as handle:
            assert handle.strategy.name == "vtc_cls"
            assert handle.strategy.keep == 0.0625  # official scripts: 36 of 576 tokens
    with vtc.patched(llava, "FastV") as handle:
        assert (handle.strategy.keep, handle.strategy.llm_layer) == (0.5, 2)  # paper: K=2, R=50%
    with vtc.patched(llava) as handle:
        assert handle.strategy.name == "none"


def test_register_strategy_plugs_in_a_new_method(llava, single):
    class KeepFirst(vtc.Strategy):
        name = "keep_first_for_test"

        def score(self, visual):
            return -torch.arange(visual.num_tokens, dtype=torch.float).expand(visual.num_images, -1)

    vtc.register_strategy(KeepFirst)
    assert "keep_first_for_test" in vtc.list_strategies()
    with torch.no_grad(), vtc.patched(llava, "keep-first-for-test", keep=3) as handle:
        llava(**single)
        assert handle.last_kept()[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="already registered"):

        class Clash(vtc.Strategy):
            name = "fastv"

        vtc.register_strategy(Clash)


def test_report_counts_and_flops(llava, batch3):
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(llava, "fastv", keep=0.25) as handle:
        with pytest.raises(RuntimeError, match="no forward"):
            handle.report()
        llava(**inputs)
        report = handle.report()
    text = str(report)
    assert "fastv" in text and "per layer" in text
    lengths = inputs["attention_mask"].sum(1).tolist()
    for b, sample in enumerate(report.samples):
        n_visual = 36 * len(sample.images)
        assert sample.visual_in == sample.visual_after_pre_llm == n_visual
        assert sample.visual_per_layer == [n_visual, n_visual, 9 * len(sample.images), 9 * len(sample.images)]
        text_tokens = lengths[b] - n_visual
        assert sample.tokens_per_layer == [lengths[b]] * 2 + [text_tokens + 9 * len(sample.images)] * 2
        config = llava.config.text_config
        assert sample.flops == pytest.approx(prefill_flops(config, sample.tokens_per_layer))
        assert sample.flops_unpatched == pytest.approx(prefill_flops(config, [lengths[b]] * 4))
        assert 0.5 < sample.flops_ratio < 1.0
    assert report.to_dict()["samples"][0]["visual_in"] == 36


def test_budget_rounding():
    assert tokens_to_keep(0.5, 576) == 288
    assert tokens_to_keep(0.1, 576) == 58  # round(57.6)
    assert tokens_to_keep(0.0001, 576) == 1
    assert tokens_to_keep(64, 576) == 64
    assert tokens_to_keep(1.0, 36) == 36


def test_top_k_sorted_breaks_ties_towards_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert top_k_sorted(scores, 2).tolist() == [[1, 2]]
    assert top_k_sorted(scores, 4).tolist() == [[0, 1, 2, 4]]


def test_composition_without_keep_takes_the_first_members_default(llava):
    handle = vtc.patch(llava, ["vtc_cls", "fastv"])
    try:
        first, second = handle.strategy.members
        assert first.keep == vtc.strategies.vtc_cls.VTCCLS.default_keep
        assert second.keep == vtc.strategies.fastv.FastV.default_keep
    finally:
        handle.unpatch()
