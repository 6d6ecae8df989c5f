"""DyVTE (dynamic visual-token exit): routers, the training utility, the announced fallback, ragged exits."""

import pytest
import torch

import vtc
from vtc.data import make_scene_qa
from vtc.strategies.dyvte import DyVTE, make_routers
from vtc.testing import llava_inputs

from .helpers import announced_fallback_report, greedy_recompute, saved_weights_logits, until_eos

N_LAYERS = 4  # tiny_llava's decoder


def _exit_layers(model, inputs, routers) -> list[int]:
    """Per sample, the first layer whose router says exit (N_LAYERS: never), from one recording run."""
    strategy = DyVTE.with_routers(routers)
    strategy._record = {}
    with torch.no_grad(), vtc.patched(model, strategy):
        model(**inputs)
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        layer = N_LAYERS
        for stage in range(1, N_LAYERS):
            logits = routers[stage - 1](strategy._record[stage][b])
            if logits[1] > logits[0]:
                layer = stage
                break
        out.append(layer)
    return out


@pytest.fixture(scope="module")
def ragged(llava, batch3):
    """Routers (seeded) under which the samples of batch3 exit at different layers, and those layers."""
    inputs = batch3[2]
    for seed in range(40):
        routers = make_routers(llava.config.text_config.hidden_size, N_LAYERS, seed=seed)
        layers = _exit_layers(llava, inputs, routers)
        if len(set(layers)) > 1:
            return routers, layers
    pytest.fail("no seed gave samples exiting at different layers")


def test_training_lowers_loss_saves_and_loads(llava, processor, tmp_path):
    before = {k: v.clone() for k, v in llava.state_dict().items()}
    path = tmp_path / "dyvte.safetensors"
    data = make_scene_qa(2, 0)
    result = vtc.train(
        llava,
        "dyvte",
        data=data,
        processor=processor,
        steps=5,
        lr=1e-3,
        batch_size=2,
        exit_layers=[2],
        save=path,
        progress=False,
    )
    assert result.losses[-1] < result.losses[0]
    assert result.path == path and path.is_file()
    assert all(torch.equal(v, before[k]) for k, v in llava.state_dict().items())  # the VLM stayed frozen
    assert "forward" not in vars(llava.model.language_model)  # train unpatched the model

    single = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": data[0]["question"]}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[data[0]["image"]], text=[single], return_tensors="pt")
    _, report = saved_weights_logits(llava, inputs, "dyvte", path, result.strategy)  # == the trained strategy
    assert not any("fallback" in n for n in report.notes)


def test_weights_missing_is_a_clear_error(llava, tmp_path):
    with pytest.raises(FileNotFoundError, match="dyvte weights not found.*vtc.train"):
        vtc.patch(llava, "dyvte", weights=tmp_path / "missing.safetensors")
    assert "forward" not in vars(llava.model.language_model)


@pytest.mark.parametrize("options,exit_at", [({}, 2), ({"exit_layer": 1}, 1), ({"exit_layer": 3}, 3)])
def test_fixed_fallback_is_announced(llava, batch3, options, exit_at):
    report = announced_fallback_report(llava, batch3[2], "dyvte", "without trained router weights.*fallback", **options)
    assert any("fallback" in n for n in report.notes) and "note: dyvte without trained" in str(report)
    assert "FALLBACK" in report.strategy
    for sample in report.samples:
        assert sample.visual_per_layer == [sample.visual_in] * exit_at + [0] * (N_LAYERS - exit_at)


def test_attention_fallback(llava, batch3):
    inputs = batch3[2]
    per_layer = {}
    for threshold in (0.999, 1e-6):
        with pytest.warns(UserWarning, match="attention to the sample's visual tokens drops below"):
            handle = vtc.patch(llava, "dyvte", attention_threshold=threshold)
        with torch.no_grad():
            llava(**inputs)
        per_layer[threshold] = [s.visual_per_layer for s in handle.report().samples]
        handle.unpatch()
    visual_in = [36, 36, 72]
    assert per_layer[0.999] == [[n, 0, 0, 0] for n in visual_in]  # mass < 0.999 at once: exit before layer 1
    assert per_layer[1e-6] == [[n] * N_LAYERS for n in visual_in]  # never below 1e-6: nothing exits


def test_ragged_exits_equal_per_sample_runs(llava, processor, batch3, ragged):
    questions, images, inputs = batch3
    routers, layers = ragged
    with torch.no_grad(), vtc.patched(llava, DyVTE.with_routers(routers)) as handle:
        batch_logits = llava(**inputs).logits
        samples = handle.report().samples
        for b, sample in enumerate(samples):
            assert sample.visual_per_layer == [sample.visual_in] * layers[b] + [0] * (N_LAYERS - layers[b])
            alone = llava(**llava_inputs(processor, [questions[b]], [images[b]])).logits[0]
            assert handle.report().samples[0].visual_per_layer == sample.visual_per_layer
            assert (batch_logits[b, -alone.shape[0] :] - alone).abs().max() <= 1e-4


def test_generate_with_cache_equals_recompute(llava, batch3, ragged):
    inputs = batch3[2]
    routers, layers = ragged
    eos = llava.config.text_config.eos_token_id
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtc.patched(llava, DyVTE.with_routers(routers)) as handle:
        cached = llava.generate(**inputs, max_new_tokens=3, do_sample=False)[:, prompt:]
        handle.reuse_selection = True
        recomputed = greedy_recompute(llava, inputs, 3)
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
