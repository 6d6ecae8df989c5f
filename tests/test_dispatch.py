"""vtc on models dispatched by accelerate (`device_map`): layers offloaded to the CPU and the disk, weights on the
`meta` device until a layer runs, loaded from a local `save_pretrained` checkpoint. Patched logits and greedy
tokens equal those of the same weights patched without dispatch (vision probes, pre-LLM and in-LLM stages)."""

from __future__ import annotations

import pytest
import torch
import transformers

import vtc
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl

STRATEGIES = [
    ("fastv", dict(keep=0.25, layer=2)),  # in-LLM: attention rows probed at layer 1
    ("todre", dict(keep=0.25)),  # pre-LLM diversity + in-LLM stage (its probe carries the layer's keys)
    ("pmod", dict(keep=0.5)),  # layer routing: a forward hook on a (possibly offloaded) MLP
    ("vtc_cls", dict(keep=0.25)),  # vision probe: [CLS] attention in the vision tower (LLaVA only)
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint directory, the model it holds, inputs): two images, left padding."""
    out = {}
    questions, images = ["what colour is the circle?", "where?"], [[make_image(0)], [make_image(1, size=64)]]
    built = [
        ("llava", tiny_llava(), llava_inputs(tiny_llava_processor(), questions, images)),
        ("qwen2_vl", tiny_qwen_vl(), qwen_inputs(tiny_qwen_processor(), questions, images)),
    ]
    for family, model, inputs in built:
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        out[family] = (path, model, inputs)
    return out


def _spread_map(model) -> dict:
    """Vision side and embeddings on the CPU; decoder layers alternately on the CPU and the disk; norm and
    lm_head on the disk."""
    inner = model.model
    device_map = {f"model.{name}": "cpu" for name, _ in inner.named_children() if name != "language_model"}
    for name, child in inner.language_model.named_children():
        if name == "layers":
            for i in range(len(child)):
                device_map[f"model.language_model.layers.{i}"] = "disk" if i % 2 else "cpu"
        else:
            device_map[f"model.language_model.{name}"] = "disk" if name == "norm" else "cpu"
    device_map["lm_head"] = "disk"
    return device_map


def _run(model, inputs, strategy, options):
    with torch.no_grad(), vtc.patched(model, strategy, **options) as handle:
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        kept = [s.visual_per_layer for s in handle.report().samples]
    return logits, tokens, kept


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("placement", ["spread", "auto"])
def test_dispatched_model_equals_the_model(checkpoints, family, placement, tmp_path):
    path, model, inputs = checkpoints[family]
    cls = type(model)
    if placement == "spread":  # an explicit map: every other decoder layer on the disk
        load = dict(device_map=_spread_map(model))
    else:  # infer_auto_device_map: what does not fit in 400 KB of CPU memory goes to the disk
        load = dict(device_map="auto", max_memory={"cpu": "400KB"})
    dispatched = cls.from_pretrained(path, dtype=torch.float32, offload_folder=tmp_path / "offload", **load).eval()
    placed = set(dispatched.hf_device_map.values())
    assert placed == {"cpu", "disk"}, dispatched.hf_device_map
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # offloaded weights load on the fly
    strategies = [(s, o) for s, o in STRATEGIES if s != "vtc_cls" or family == "llava"]
    if placement == "auto":  # the vision tower's last layers are on the disk here: one vision-side strategy
        strategies = strategies[-1:] if family == "llava" else strategies[1:2]
    for strategy, options in strategies:
        want_logits, want_tokens, want_kept = _run(model, inputs, strategy, options)
        got_logits, got_tokens, got_kept = _run(dispatched, inputs, strategy, options)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0, msg=strategy)
        assert torch.equal(got_tokens, want_tokens), strategy
        assert got_kept == want_kept, strategy
    with torch.no_grad():  # unpatched again: the dispatched model is the model
        torch.testing.assert_close(dispatched(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)


def test_device_map_passes_through_the_lmms_eval_plug_in(checkpoints, tmp_path):
    pytest.importorskip("lmms_eval")
    from vtc.integrations.lmms_eval import VTCModel, parse_max_memory

    path, model, _ = checkpoints["llava"]
    tiny_llava_processor().save_pretrained(path)
    lm = VTCModel.create_from_arg_string(
        f"pretrained={path},device_map=auto,max_memory=cpu:400KB,offload_folder={tmp_path},strategy=fastv,keep=0.25"
    )
    assert set(lm.model.hf_device_map.values()) == {"cpu", "disk"} and lm.handle.active
    assert isinstance(lm.model, transformers.LlavaForConditionalGeneration) and lm.device == torch.device("cpu")
    assert parse_max_memory("0:70GiB;cpu:100GiB") == {0: "70GiB", "cpu": "100GiB"}
    with pytest.raises(ValueError, match="save_pretrained"):
        VTCModel(pretrained="vtc-tiny", device_map="auto")
