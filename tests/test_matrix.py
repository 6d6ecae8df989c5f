"""Every strategy on every adapter: the README's adapter x strategy table is this test.

Each cell: a left-padded batch runs patched, no image keeps more than it had, and generate() with the KV
cache gives the same greedy tokens as generate(use_cache=False) recomputing every step from the same
selection (`reuse_selection`). A strategy whose probes a model cannot provide must be refused at patch()
with a message that names the reason, leaving the model unpatched."""

import pytest
import torch

import vtc
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor
from vtc.testing.internvl import internvl_inputs, tiny_internvl, tiny_internvl_processor
from vtc.testing.internvl import make_wide_image as make_internvl_wide_image
from vtc.testing.llava_next import (
    make_video,
    make_wide_image,
    next_inputs,
    onevision_video_inputs,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)
from vtc.testing.qwen2_vl import make_video as make_qwen_video
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl
from vtc.testing.qwen3_vl import qwen3_inputs, tiny_qwen3_processor, tiny_qwen3_vl

from .helpers import until_eos

QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word."]
STRATEGIES = [s for s in vtc.list_strategies() if s != "none"]
# probes a family cannot provide (no [CLS] on SigLIP; HiRED needs a real [CLS]); QuoTA cannot score Qwen3-VL
# frames with the model itself (DeepStack); PruMerge+'s single-head [CLS] probe and concatenated keys exist on CLIP
# towers only
CLS_ONLY_A = {"fastervlm": "[CLS]", "vispruner": "[CLS]", "holov": "[CLS]", "prumerge_plus": "[CLS]"}
UNSUPPORTED = {
    "llava_onevision": {"vtc_cls": "[CLS]", "visionzip": "[CLS]", "todre": "[CLS]", "hired": "[CLS]", **CLS_ONLY_A},
    "llava_onevision_video": {
        "vtc_cls": "[CLS]", "visionzip": "[CLS]", "todre": "[CLS]", "hired": "[CLS]", **CLS_ONLY_A
    },
    "qwen2_vl": {"hired": "[CLS]", "prumerge_plus": "[CLS]"},
    "qwen2_5_vl": {"hired": "[CLS]", "prumerge_plus": "[CLS]"},
    "qwen3_vl": {"hired": "[CLS]", "quota": "scorer", "prumerge_plus": "[CLS]"},
    "qwen3_vl_moe_video": {"hired": "[CLS]", "quota": "scorer", "prumerge_plus": "[CLS]"},
    "internvl": {"prumerge_plus": "cannot provide"},
}
for _family in ("llava_onevision", "llava_onevision_video"):  # SCOPE's saliency, MustDrop's key tokens: [CLS]
    UNSUPPORTED[_family].update(scope="[CLS]", mustdrop="[CLS]")
# video-only strategies: the image cases' prompts are refused at their first forward, naming the rule (EVS compares
# each token with the previous frame's; vLLM never prunes images)
REFUSES_IMAGES = {"evs": "prunes video frames only"}
IMAGE_CASES = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen3_vl", "internvl"}
# tiny grids have few whole 3 x 3 windows: MustDrop's in-LLM filter, with thresholds that drop on tiny models, shows
STRATEGY_OPTIONS = {"mustdrop": {"global_thr": 0.3, "individual_thr": 0.3}}
# video-only methods: on images (single frames) they keep every token, as their official code, and say so
KEEPS_IMAGES = {"dycoke": "TTM compares frames of a video"}
VIDEO_CASES = {"llava_onevision_video", "qwen2_5_vl", "qwen3_vl_moe_video"}



def _case(name):
    """(model, inputs, processor) of one adapter case: a batch of two prompts."""
    if name == "llava":
        processor = tiny_llava_processor()
        images = [[make_image(0)], [make_image(1)]]
        return tiny_llava("llama", seed=21), llava_inputs(processor, QUESTIONS, images), processor
    if name == "llava_next":
        processor = tiny_llava_next_processor()
        images = [[make_wide_image(0)], [make_image(1)]]
        return tiny_llava_next("llama", seed=22), next_inputs(processor, QUESTIONS, images), processor
    if name == "llava_onevision":
        processor = tiny_llava_onevision_processor()
        images = [[make_wide_image(0)], [make_image(1)]]
        return tiny_llava_onevision("qwen2", seed=23), next_inputs(processor, QUESTIONS, images), processor
    if name == "llava_onevision_video":
        processor = tiny_llava_onevision_processor()
        inputs = onevision_video_inputs(
            processor, ["What happens?", "Describe the clip."], [make_video(0), make_video(1)]
        )
        return tiny_llava_onevision("qwen2", seed=23), inputs, processor
    if name == "internvl":  # tiles + thumbnail, and a single-tile picture
        processor = tiny_internvl_processor()
        images = [[make_internvl_wide_image(0)], [make_image(1, size=48)]]
        return tiny_internvl("qwen2", seed=26), internvl_inputs(processor, QUESTIONS, images), processor
    if name == "qwen3_vl":
        processor = tiny_qwen3_processor()
        images = [[make_image(0, size=64)], [make_image(1, size=96)]]
        return tiny_qwen3_vl("qwen3_vl", seed=25), qwen3_inputs(processor, QUESTIONS, images=images), processor
    if name == "qwen3_vl_moe_video":
        processor = tiny_qwen3_processor()
        videos = [[make_qwen_video(0, size=(64, 96))], [make_qwen_video(1, size=(64, 96))]]
        inputs = qwen3_inputs(processor, ["What happens?", "Describe it."], videos=videos)
        return tiny_qwen3_vl("qwen3_vl_moe", seed=25), inputs, processor
    family = name
    processor = tiny_qwen_processor()
    model = tiny_qwen_vl(family, seed=24)
    if family == "qwen2_vl":
        images = [[make_image(0, size=56)], [make_image(1, size=84)]]
        return model, qwen_inputs(processor, QUESTIONS, images=images), processor
    videos = [[make_qwen_video(0)], [make_qwen_video(1)]]
    return model, qwen_inputs(processor, ["What happens?", "Describe it."], videos=videos), processor


CASES = ["llava", "llava_next", "llava_onevision", "llava_onevision_video", "qwen2_vl", "qwen2_5_vl"]
CASES += ["qwen3_vl", "qwen3_vl_moe_video"]
CASES += ["internvl"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model, inputs, processor = _case(request.param)
    return request.param, model, dict(inputs), processor


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_runs_on_adapter(case, strategy):
    name, model, inputs, processor = case
    missing = UNSUPPORTED.get(name, {}).get(strategy)
    if missing:
        with pytest.raises(ValueError, match=missing.replace("[", r"\[").replace("]", r"\]")):
            vtc.patch(model, strategy, keep=0.25, processor=processor)
        assert "forward" not in vars(model.model.language_model)
        return
    if strategy in REFUSES_IMAGES and name in IMAGE_CASES:
        with torch.no_grad(), vtc.patched(model, strategy, keep=0.25) as handle:
            with pytest.raises(ValueError, match=REFUSES_IMAGES[strategy]):
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert not handle.active and "forward" not in vars(model.model.language_model)
        return
    eos = model.config.text_config.eos_token_id
    prompt = inputs["input_ids"].shape[1]
    # the processor goes to the strategies that build prompts with it (QuoTA); the others ignore it
    options = STRATEGY_OPTIONS.get(strategy, {})
    with torch.no_grad(), vtc.patched(model, strategy, keep=0.25, processor=processor, **options) as handle:
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, prompt:]
        report = handle.report()
        handle.reuse_selection = True
        recomputed = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)[:, prompt:]
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
    for sample in report.samples:
        assert sample.visual_in > 0
        assert max(sample.visual_per_layer) <= sample.visual_after_pre_llm <= sample.visual_in
        if strategy in KEEPS_IMAGES and name not in VIDEO_CASES:
            assert sample.visual_per_layer[-1] == sample.visual_in and KEEPS_IMAGES[strategy] in str(report)
        else:
            assert sample.visual_per_layer[-1] < sample.visual_in  # keep=0.25 dropped something
