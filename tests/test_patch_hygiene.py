"""What users do to a patched model besides calling it, on every adapter family: deep copies, pickling, wrong
weight files, malformed patch() arguments, labels=. Each either works like the unpatched model would, or fails at
the earliest point with a message that names the way out, leaving the model as it was."""

import copy
import io
import pickle

import pytest
import torch
from safetensors.torch import save_file

import vtc
from vtc.strategies.dyvte import make_routers, save_routers

from .helpers import assert_restored, restore_snapshot
from .test_matrix import CASES, _case

# one strategy with a pre-LLM and one with an in-LLM stage, both available on every family
STRATEGY = ["random", ("fastv", {"keep": 0.5})]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model, inputs, processor = _case(request.param)
    return request.param, model, dict(inputs), processor


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_deepcopy_is_patched_like_the_original_and_unpatchable(case):
    _, model, inputs, _ = case
    snapshot = restore_snapshot(model, inputs)
    handle = vtc.patch(model, STRATEGY, keep=0.5)
    try:
        patched = _logits(model, inputs)
        kept = handle.last_kept()
        clone = copy.deepcopy(model)
        clone_handle = vtc.api._ACTIVE[clone]
        assert clone_handle is not handle and clone_handle.model is clone
        assert torch.equal(_logits(clone, inputs), patched)  # compressed, same selection (a seeded baseline)
        assert all(torch.equal(a, b) for a, b in zip(clone_handle.last_kept(), kept))
        assert torch.equal(_logits(model, inputs), patched)  # the original is still patched, and unaffected
        vtc.unpatch(clone)
        assert_restored(clone, inputs, snapshot)  # the copy's hooks are gone: the unpatched model's logits
        assert torch.equal(_logits(model, inputs), patched)
    finally:
        handle.unpatch()
    assert_restored(model, inputs, snapshot)


def test_pickling_a_patched_model_is_refused_with_the_fix(case):
    _, model, inputs, _ = case
    snapshot = restore_snapshot(model, inputs)
    with vtc.patched(model, "random", keep=0.5):
        with pytest.raises(TypeError, match="cannot be pickled.*save_pretrained"):
            pickle.dumps(model)
        with pytest.raises(TypeError, match="cannot be pickled"):
            torch.save(model, io.BytesIO())
        torch.save(model.state_dict(), io.BytesIO())  # the way out named in the message works
    assert_restored(model, inputs, snapshot)  # the pickling guards are gone with the patch


def test_weights_for_another_model_size_are_refused_at_patch(case, tmp_path):
    _, model, inputs, _ = case
    snapshot = restore_snapshot(model, inputs)
    config = model.config.get_text_config()
    wrong = tmp_path / "dyvte_wide.safetensors"
    save_routers(make_routers(2 * config.hidden_size, config.num_hidden_layers), wrong)
    with pytest.raises(ValueError, match=f"dyvte weights '{wrong}'.*hidden size {2 * config.hidden_size}"):
        vtc.patch(model, "dyvte", weights=str(wrong))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    for name in ("dyvte", "pmod", "atp"):
        with pytest.raises(ValueError, match=f"{name} weights '{corrupt}' are not a readable safetensors file"):
            vtc.patch(model, name, weights=str(corrupt))
    assert_restored(model, inputs, snapshot)


def test_wide_pmod_and_atp_weights_are_refused_at_patch(tmp_path):
    model, inputs, _ = _case("llava")
    snapshot = restore_snapshot(model, inputs)
    hidden = model.config.text_config.hidden_size
    pmod = tmp_path / "pmod.safetensors"
    save_file({"routers.1.weight": torch.zeros(1, 2 * hidden), "routers.1.bias": torch.zeros(1)}, str(pmod))
    with pytest.raises(ValueError, match=f"pmod weights '{pmod}'.*hidden size {2 * hidden}.*has {hidden}"):
        vtc.patch(model, "pmod", weights=str(pmod), ratios={1: 0.5})
    from vtc.strategies.atp import make_modules, save_modules

    atp = tmp_path / "atp.safetensors"
    layers = [1, 2]
    save_modules(make_modules(2 * hidden, len(layers)), atp, layers, model.config.text_config.num_hidden_layers, 2)
    with pytest.raises(ValueError, match=f"atp weights '{atp}'.*hidden size {2 * hidden}"):
        vtc.patch(model, "atp", weights=str(atp))
    assert_restored(model, dict(inputs), snapshot)


@pytest.mark.parametrize(
    "strategy, options, error, match",
    [
        ([], {}, ValueError, "empty composition"),
        (["random", ("fastv", {}, 1)], {}, TypeError, r"composition member \('fastv', \{\}, 1\)"),
        (["random", ("fastv", "keep=0.5")], {}, TypeError, "composition member"),
        ("fastv", {"layer": True}, TypeError, "layer=True; a layer is an int"),
        ("fastv", {"layer": 2.7}, TypeError, "layer=2.7; a layer is an int"),
        ("vtc_cls", {"start_layer": 1.5}, TypeError, "start_layer=1.5"),
        ("atp", {"layers": [1, 2.5]}, TypeError, r"layers=\[1, 2.5\]"),
    ],
)
def test_malformed_patch_arguments_fail_loud(case, strategy, options, error, match):
    _, model, inputs, _ = case
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with pytest.raises(error, match=match):
        vtc.patch(model, strategy, **options)
    assert model not in vtc.api._ACTIVE and "forward" not in vars(model.model.language_model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


def test_labels_are_refused_before_the_model_runs(case):
    _, model, inputs, _ = case
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with vtc.patched(model, "none"), torch.no_grad():
        with pytest.raises(ValueError, match="labels= is not supported on a model patched by vtc"):
            model(**inputs, labels=labels)
    with torch.no_grad():
        assert model(**inputs, labels=labels).loss is not None  # unpatched: the model's own loss
