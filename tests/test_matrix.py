"""Every strategy on every adapter: the README's adapter x strategy table is this test.

Each cell: a left-padded batch runs patched, no image keeps more than it had, and generate() with the KV
cache gives the same greedy tokens as generate(use_cache=False) recomputing every step from the same
selection (`reuse_selection`). A strategy whose probes a model cannot provide must be refused at patch()
with a message that names the reason, leaving the model unpatched."""

import pytest
import torch

import vtc
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor
from vtc.testing_llava_next import (
    make_video,
    make_wide_image,
    next_inputs,
    onevision_video_inputs,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)
from vtc.testing_qwen import make_video as make_qwen_video
from vtc.testing_qwen import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl

from .helpers import until_eos

QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word."]
STRATEGIES = [s for s in vtc.list_strategies() if s != "none"]
# probes a family cannot provide (no [CLS] on SigLIP; no per-head keys probe on the Qwen vision tower)
UNSUPPORTED = {
    "llava_onevision": {"vtc_cls": "[CLS]", "visionzip": "[CLS]", "todre": "[CLS]"},
    "llava_onevision_video": {"vtc_cls": "[CLS]", "visionzip": "[CLS]", "todre": "[CLS]"},
    "qwen2_vl": {"visionzip": "keys", "tome": "keys"},
    "qwen2_5_vl": {"visionzip": "keys", "tome": "keys"},
}


def _case(name):
    if name == "llava":
        processor = tiny_llava_processor()
        return tiny_llava("llama", seed=21), llava_inputs(processor, QUESTIONS, [[make_image(0)], [make_image(1)]])
    if name == "llava_next":
        processor = tiny_llava_next_processor()
        return tiny_llava_next("llama", seed=22), next_inputs(
            processor, QUESTIONS, [[make_wide_image(0)], [make_image(1)]]
        )
    if name == "llava_onevision":
        processor = tiny_llava_onevision_processor()
        images = [[make_wide_image(0)], [make_image(1)]]
        return tiny_llava_onevision("qwen2", seed=23), next_inputs(processor, QUESTIONS, images)
    if name == "llava_onevision_video":
        processor = tiny_llava_onevision_processor()
        inputs = onevision_video_inputs(
            processor, ["What happens?", "Describe the clip."], [make_video(0), make_video(1)]
        )
        return tiny_llava_onevision("qwen2", seed=23), inputs
    family = name
    processor = tiny_qwen_processor()
    model = tiny_qwen_vl(family, seed=24)
    if family == "qwen2_vl":
        return model, qwen_inputs(processor, QUESTIONS, images=[[make_image(0, size=56)], [make_image(1, size=84)]])
    return model, qwen_inputs(
        processor, ["What happens?", "Describe it."], videos=[[make_qwen_video(0)], [make_qwen_video(1)]]
    )


CASES = ["llava", "llava_next", "llava_onevision", "llava_onevision_video", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model, inputs = _case(request.param)
    return request.param, model, dict(inputs)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_runs_on_adapter(case, strategy):
    name, model, inputs = case
    missing = UNSUPPORTED.get(name, {}).get(strategy)
    if missing:
        with pytest.raises(ValueError, match=missing.replace("[", r"\[").replace("]", r"\]")):
            vtc.patch(model, strategy, keep=0.25)
        assert "forward" not in vars(model.model.language_model)
        return
    eos = model.config.text_config.eos_token_id
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtc.patched(model, strategy, keep=0.25) as handle:
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, prompt:]
        report = handle.report()
        handle.reuse_selection = True
        recomputed = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)[:, prompt:]
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
    for sample in report.samples:
        assert sample.visual_in > 0
        assert max(sample.visual_per_layer) <= sample.visual_after_pre_llm <= sample.visual_in
        assert sample.visual_per_layer[-1] < sample.visual_in  # keep=0.25 dropped something
