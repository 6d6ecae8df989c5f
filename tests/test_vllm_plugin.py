"""vtc.integrations.vllm without vLLM: overrides() validates like vtc.patch and refuses what vLLM cannot serve.
(The engine tests live in tests/vllm/, run through .venv-vllm by `make vllm-test`.)"""

import json
import subprocess
import sys

import pytest
import torch

from vtc.integrations.vllm import (
    MODELS,
    REFUSED,
    SERVED,
    check_architecture,
    make_strategy,
    overrides,
    request_settings,
    served_budget,
)


def test_overrides_is_the_server_json():
    assert overrides("vtc_cls", keep=0.25) == {"vtc": {"strategy": "vtc_cls", "keep": 0.25}}
    assert overrides("VTC-CLS", keep=16, start_layer=1)["vtc"] == {"strategy": "vtc_cls", "keep": 16, "start_layer": 1}
    assert json.loads(json.dumps(overrides("random", keep=0.1, seed=3))) == overrides("random", keep=0.1, seed=3)


def test_keep_none_is_the_paper_default():
    assert make_strategy(overrides("vtc_cls")["vtc"]).keep == 0.0625


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_the_reason(name):
    with pytest.raises(ValueError, match="cannot run inside vLLM: .*(budget|in-LLM)"):
        overrides(name, keep=0.25)


def test_bad_input_fails_like_patch():
    with pytest.raises(ValueError, match="unknown strategy 'nope'; known strategies"):
        overrides("nope")
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        overrides("vtc_cls", keep=1.5)
    with pytest.raises(TypeError, match="options of strategy 'random': seed"):
        overrides("random", seeed=1)
    with pytest.raises(ValueError, match="placement='vision'.* merges inside the vision tower"):
        overrides("tome", keep=0.25, placement="vision")
    with pytest.raises(ValueError, match="todre's stage 2 prunes inside the decoder"):
        overrides("todre", keep=0.25, stage2=True)


def test_todre_is_stage_one_only():
    assert overrides("todre", keep=0.25)["vtc"] == {"strategy": "todre", "keep": 0.25, "stage2": False}
    assert make_strategy(overrides("todre")["vtc"]).prune_layers(32) == []


def test_every_pre_llm_fixed_budget_strategy_is_served():
    assert set(SERVED) == {"vtc_cls", "fopru", "visionzip", "hired", "tome", "todre", "random", "downsample"}
    for name in SERVED:
        assert make_strategy(overrides(name)["vtc"]).stage == "pre_llm"


def test_request_settings_and_budget():
    engine = overrides("vtc_cls", keep=0.25, start_layer=1)["vtc"]
    assert request_settings(engine, {}) == engine
    assert request_settings(engine, {"vtc_keep": 5}) == {**engine, "keep": 5}  # the engine's options stay
    assert request_settings(engine, {"vtc_strategy": "random"}) == {"strategy": "random", "keep": None}
    assert served_budget(make_strategy(engine), 576) == 144
    assert served_budget(make_strategy(request_settings(engine, {"vtc_keep": 5})), 576) == 5
    assert served_budget(make_strategy(overrides("hired", keep=0.1)["vtc"]), 576) == 57  # int(576 * 0.1)
    with pytest.raises(ValueError, match="cannot run inside vLLM"):
        request_settings(engine, {"vtc_strategy": "fastv"})


def test_importing_vtc_does_not_import_vllm():
    code = "import sys, vtc, vtc.integrations.vllm; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vtc_key_on_an_unserved_architecture_fails_loud():
    from types import SimpleNamespace

    with_vtc = SimpleNamespace(**overrides("vtc_cls", keep=0.25))
    for arch in MODELS:
        check_architecture(arch, with_vtc)  # served: passes
    check_architecture("LlamaForCausalLM", SimpleNamespace())  # no vtc key: vLLM's own model, untouched
    with pytest.raises(ValueError, match="does not serve architecture 'LlamaForCausalLM'.*served architectures: "):
        check_architecture("LlamaForCausalLM", with_vtc)


def test_mrope_positions_of_a_shortened_prompt_are_the_original_ones():
    """Oracle: transformers' Qwen2.5-VL M-RoPE positions of the full prompt (get_rope_index), taken at the kept
    tokens, equal the plug-in's positions of the shortened prompt (request-time text positions + kept tokens' grid
    offsets); two images of different shapes (3 x 3 and 2 x 3 tokens), each keeping some of its tokens."""
    from vtc.integrations.vllm.mrope import add_offsets, kept_offsets, prompt_positions
    from vtc.testing import make_image
    from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl

    model = tiny_qwen_vl("qwen2_5_vl")
    processor = tiny_qwen_processor()
    images = [make_image(0), make_image(1).resize((84, 56))]
    inputs = qwen_inputs(processor, ["two pictures"], images=[images])
    ids, grids = inputs["input_ids"], inputs["image_grid_thw"]
    full, delta = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=grids)
    is_image = ids[0] == model.config.image_token_id
    starts = [int(i) for i in torch.nonzero(is_image).flatten() if i == 0 or not is_image[i - 1]]
    token_grids = [(int(h) // 2, int(w) // 2) for _, h, w in grids.tolist()]
    kept = [torch.tensor([0, 4, 8]), torch.tensor([1, 5])]  # raster indices per image
    keep_mask = ~is_image.clone()
    for start, index in zip(starts, kept):
        keep_mask[start + index] = True
    short = keep_mask.sum().item()
    spans = []
    for start, index, grid in zip(starts, kept, token_grids):
        offset = int(keep_mask[:start].sum())
        spans.append((offset, len(index), (1, *grid)))
    positions, short_delta = prompt_positions(short, spans)
    is_media = torch.zeros(short, dtype=torch.bool)
    for offset, length, _ in spans:
        is_media[offset : offset + length] = True
    offsets = torch.cat([kept_offsets(index, grid) for index, grid in zip(kept, token_grids)])
    moved = add_offsets(positions, is_media, offsets)
    assert torch.equal(moved, full[:, 0, keep_mask])
    assert short_delta == int(delta) + (ids.shape[1] - short)  # the same next position after the prompt
