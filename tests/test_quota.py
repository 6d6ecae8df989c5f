"""QuoTA (Luo et al., arXiv:2503.08689): per-frame budgets from a scorer's p("A"), bilinear frame reduction.

Hand-computed allocations, the reductions against torch references, the scorer against a manual run of the
unpatched model on the one-frame prompt, realised per-frame budgets, and the invariants (generate with the
cache == recompute from the same selection, exact unpatch, clear errors) on LLaVA-OneVision and Qwen2-VL video.
"""

import importlib.util
import math
import re

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.adapters.llava_next import kept_by_unit
from vtc.strategies.quota import (
    QUERY_PROMPT,
    cap_weights,
    frame_budgets,
    frame_images,
    frame_weights,
    parse_cot_objects,
    reduce_frame,
    target_grid,
)
from vtc.testing.llava_next import (
    make_video,
    make_wide_image,
    next_inputs,
    onevision_video_inputs,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)
from vtc.testing.qwen2_vl import make_video as make_qwen_video
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl

from .helpers import hook_count, instance_attributes, until_eos

QWEN_SIZE = (56, 84)  # (h, w) px: a 2 x 3 merged-token grid per temporal patch


# --- allocation: w = (100 p)^2 normalised, n_i = int(total w_i) ---------------------------------------
def test_weights_and_budgets_hand_computed():
    probs = [0.9, 0.3, 0.0, 0.6]  # (100 p)^2 = 8100, 900, 0, 3600; sum 12600
    w = frame_weights(probs)
    assert torch.allclose(w, torch.tensor([8100, 900, 0, 3600], dtype=torch.float64) / 12600)
    # total 40: 40 * 8100 / 12600 = 25.7, 40 * 900 / 12600 = 2.86, 0, 40 * 3600 / 12600 = 11.4
    assert frame_budgets(probs, 40, cap=100) == [25, 2, 0, 11]
    assert frame_budgets([0.5, 0.5, 0.5, 0.5], 10, cap=100) == [2, 2, 2, 2]  # int(2.5): 2 of 10 lost, as the paper
    assert frame_budgets([0.0, 0.0], 6, cap=10) == [3, 3]  # no evidence anywhere: uniform


def test_cap_redistributes_in_proportion():
    # w = 2/3, 1/6, 1/6; cap 6 of 12 tokens = 0.5: the 1/6 excess is shared 1:1 -> 0.5, 0.25, 0.25
    assert torch.allclose(cap_weights(frame_weights([1.0, 0.5, 0.5]), 0.5), torch.tensor([0.5, 0.25, 0.25]).double())
    assert frame_budgets([1.0, 0.5, 0.5], 12, cap=6) == [6, 3, 3]
    # 4 frames of 4 tokens, total 8 (keep 0.5): w = .643, .071, 0, .286 -> capped .5, .1, 0, .4 -> 4, 0, 0, 3
    assert frame_budgets([0.9, 0.3, 0.0, 0.6], 8, cap=4) == [4, 0, 0, 3]


def test_target_grid_is_the_official_v1_formula():
    # square grids: th = tw = int(sqrt(n)), then th + 1 if it fits, else tw + 1 if it fits
    assert target_grid(196, 27, 27) == (14, 14)
    assert target_grid(10, 27, 27) == (3, 3)
    assert target_grid(12, 27, 27) == (4, 3)
    assert target_grid(20, 27, 27) == (5, 4)
    assert target_grid(3, 2, 2) == (2, 1)
    assert target_grid(0, 4, 4) == (0, 0)
    assert target_grid(16, 4, 4) == (4, 4)
    for n in range(1, 37):  # non-square grids: within the grid and the budget
        th, tw = target_grid(n, 4, 9)
        assert 1 <= th <= 4 and 1 <= tw <= 9 and th * tw <= n


@pytest.mark.parametrize("grid,n", [((6, 6), 10), ((6, 6), 4), ((4, 6), 9), ((5, 5), 1)])
def test_bilinear_reduction_matches_interpolate(grid, n):
    rows, cols = grid
    torch.manual_seed(0)
    features = torch.randn(rows * cols, 8)
    index, merged = reduce_frame(features, grid, n, "bilinear")
    th, tw = target_grid(n, rows, cols)
    ref = F.interpolate(features.T.reshape(1, 8, rows, cols), size=(th, tw), mode="bilinear", align_corners=False)
    assert torch.allclose(merged, ref.reshape(8, -1).T, atol=1e-6)
    assert len(index) == th * tw and torch.equal(index, index.sort().values) and len(set(index.tolist())) == th * tw
    # each resized token sits at the source token nearest its cell centre
    r = [math.floor((i + 0.5) * rows / th) for i in range(th)]
    c = [math.floor((j + 0.5) * cols / tw) for j in range(tw)]
    assert index.tolist() == [a * cols + b for a in r for b in c]


def test_pool_and_tome_reductions():
    torch.manual_seed(1)
    features = torch.randn(36, 8)
    index, merged = reduce_frame(features, (6, 6), 9, "pool")
    ref = F.adaptive_avg_pool2d(features.T.reshape(1, 8, 6, 6), (3, 3))
    assert torch.allclose(merged, ref.reshape(8, -1).T, atol=1e-6) and len(index) == 9
    index, merged = reduce_frame(features, (6, 6), 7, "tome")
    assert len(index) == 7 and merged.shape == (7, 8) and torch.equal(index, index.sort().values)
    index, merged = reduce_frame(features, (6, 6), 36, "bilinear")
    assert torch.equal(index, torch.arange(36)) and torch.equal(merged, features)
    assert len(reduce_frame(features, (6, 6), 0)[0]) == 0


def test_parse_cot_objects():
    text = 'Step 1: yes\nStep 2: ["blue ballons", "long table", "video"]\nStep 3: ["blue ballons", "long table"]'
    assert parse_cot_objects(text) == ["blue ballons", "long table"]
    assert parse_cot_objects("Step 1: no") == []
    assert parse_cot_objects("Step 1: yes\nStep 3: [not python") == []


# --- models --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onevision():
    processor = tiny_llava_onevision_processor()
    model = tiny_llava_onevision("qwen2", seed=23)
    videos = [make_video(0, frames=4), make_video(1, frames=4)]
    inputs = dict(onevision_video_inputs(processor, ["What happens?", "Describe the clip."], videos))
    return model, processor, inputs, videos


@pytest.fixture(scope="module")
def qwen():
    processor = tiny_qwen_processor()
    model = tiny_qwen_vl("qwen2_vl", seed=24)
    videos = [make_qwen_video(0, frames=8, size=QWEN_SIZE), make_qwen_video(1, frames=8, size=QWEN_SIZE)]
    inputs = qwen_inputs(processor, ["What happens?", "Describe it."], videos=[[videos[0]], [videos[1]]])
    return model, processor, inputs, videos


def _answer_probability(model, inputs, answer_id: int) -> float:
    with torch.no_grad():
        return float(model(**inputs).logits[0, -1].float().softmax(-1)[answer_id])


def test_scorer_equals_manual_run_onevision(onevision):
    model, processor, inputs, videos = onevision
    query = "What happens?"
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor, query=query) as handle:
        model(**inputs)
        plan = handle.strategy.last_plan
        answer = handle.strategy.answer_id()
    assert answer == processor.tokenizer.convert_tokens_to_ids("A")
    assert len(plan) == 8 and all(p["video"] == ("video", p["unit"] // 4) for p in plan)
    prompt = QUERY_PROMPT.format(query=query)
    for entry in plan:
        video, frame = divmod(entry["unit"], 4)
        one = onevision_video_inputs(processor, [prompt], [[videos[video][frame]]])
        assert entry["p"] == pytest.approx(_answer_probability(model, one, answer), abs=1e-6, rel=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_scorer_equals_manual_run_qwen(qwen, family):
    model, processor, inputs, videos = qwen
    if family != "qwen2_vl":
        model = tiny_qwen_vl(family, seed=24)
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.25, processor=processor, objects=["cat", "ball"]) as h:
        model(**inputs)
        plan = h.strategy.last_plan
        answer = h.strategy.answer_id()
    prompt = "Does the image contain any object of cat, ball? A. yes, B. no\nAnswer with the option's letter directly."
    assert set(h.strategy.last_prompts.values()) == {prompt}
    assert len(plan) == 8  # 2 videos x 4 temporal patches
    for entry in plan:
        video, t = divmod(entry["unit"], 4)
        one = qwen_inputs(processor, [prompt], videos=[[videos[video][2 * t : 2 * t + 2]]])
        assert entry["p"] == pytest.approx(_answer_probability(model, one, answer), abs=1e-6, rel=1e-4)


def _fixed_scorer(probs):
    calls = []

    def scorer(features, grid, prompt):
        calls.append((features.shape, grid, prompt))
        return torch.tensor(probs[len(calls) - 1])

    return scorer, calls


def test_budgets_realised_per_frame_onevision(onevision):
    model, processor, inputs, _ = onevision
    probs = [[0.9, 0.3, 0.0, 0.6], [0.5, 0.5, 0.5, 0.5]]
    scorer, calls = _fixed_scorer(probs)
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor, scorer=scorer) as handle:
        model(**inputs)
        units = kept_by_unit(handle, "pre_llm")
        report = handle.report()
    assert len(calls) == 2 and calls[0][1] == (2, 2)
    # 4 frames of 2 x 2 tokens, keep 0.5: total 8 per video. Video 0: budgets 4, 0, 0, 3 (see above) -> grids
    # 2x2, dropped, dropped, 2x1; video 1: 2 each -> 2x1 (official v1: th = 1 + 1 fits, tw = 1)
    assert [len(u["kept"]) for u in units[0]] == [4, 0, 0, 2]
    assert [len(u["kept"]) for u in units[1]] == [2, 2, 2, 2]
    plan = handle.strategy.last_plan
    assert [p["budget"] for p in plan] == [4, 0, 0, 3, 2, 2, 2, 2]
    assert [p["kept"] for p in plan] == [len(u["kept"]) for sample in units for u in sample]
    assert [s.visual_after_pre_llm for s in report.samples] == [6, 8]
    assert "quota (callable scorer): 8 frame scoring passes" in str(report)
    assert "2 of 8 frames/images dropped" in str(report)


def test_budgets_realised_per_frame_qwen(qwen):
    model, processor, inputs, _ = qwen
    scorer, _ = _fixed_scorer([[1.0, 0.0, 0.5, 0.5], [0.2, 0.4, 0.6, 0.8]])
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor, scorer=scorer) as handle:
        model(**inputs)
        kept = handle.last_kept("pre_llm")
        plan = handle.strategy.last_plan
    # 4 temporal patches of 2 x 3 tokens, keep 0.5: total 12 per video
    # video 0: w = 2/3, 0, 1/6, 1/6, cap 1/2 -> .5, 0, .25, .25 -> 6, 0, 3, 3 -> grids 2x3, -, 1x3, 1x3
    assert [p["budget"] for p in plan[:4]] == [6, 0, 3, 3]
    assert [p["grid"] for p in plan[:4]] == [(2, 3), (0, 0), (1, 3), (1, 3)]
    # video 1: w = 4, 16, 36, 64 / 120 -> int(12 w) = 0, 1, 3, 6
    assert [p["budget"] for p in plan[4:]] == [0, 1, 3, 6]
    assert [p["kept"] for p in plan] == [6, 0, 3, 3, 0, 1, 3, 6]
    assert [len(k) for k in kept] == [12, 10]
    layout = handle.adapter.last_layout
    assert [u["t"] for u in layout.extras["units"]] == [0, 1, 2, 3] * 2


@pytest.mark.parametrize("reduction", ["bilinear", "pool", "tome"])
def test_generate_cache_equals_recompute_onevision(onevision, reduction):
    model, processor, inputs, _ = onevision
    _cache_vs_recompute(model, inputs, dict(processor=processor, reduction=reduction), keep=0.5)


def test_generate_cache_equals_recompute_qwen(qwen):
    model, processor, inputs, _ = qwen
    _cache_vs_recompute(model, inputs, dict(processor=processor), keep=0.25)


def _cache_vs_recompute(model, inputs, options, keep):
    eos = model.config.text_config.eos_token_id
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtc.patched(model, "quota", keep=keep, **options) as handle:
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, prompt:]
        report = handle.report()
        handle.reuse_selection = True
        recomputed = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)[:, prompt:]
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
    for sample in report.samples:
        assert 0 < sample.visual_after_pre_llm < sample.visual_in
    assert "frame scoring passes" in str(report)


def test_query_read_from_prompt(onevision, qwen):
    for model, processor, inputs, _ in (onevision, qwen):
        with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor) as handle:
            model(**inputs)
        # the tiny tokenizers decode with a space between tokens: compare without whitespace
        prompts = ["".join(p.split()) for p in handle.strategy.last_prompts.values()]
        assert len(prompts) == 2
        assert prompts[0].startswith("Whathappens?Doestheimagecontainsufficientinformation")


def test_cot_decoupling_runs_and_is_counted(onevision):
    model, processor, inputs, _ = onevision
    options = dict(processor=processor, cot=True, cot_max_new_tokens=3)
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, **options) as handle:
        model(**inputs)
        report = str(handle.report())
    assert "+2 CoT generations" in report and "quota (the model itself): 8 frame scoring passes" in report


def test_images_are_single_frames_without_scoring():
    processor = tiny_llava_onevision_processor()
    model = tiny_llava_onevision("qwen2", seed=23)
    inputs = next_inputs(processor, ["What is it?", "Describe."], [[make_wide_image(0)], [make_wide_image(1)]])
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor) as handle:
        model(**inputs)
        units = kept_by_unit(handle, "pre_llm")
        report = str(handle.report())
    assert "0 frame scoring passes" in report
    for sample in units:
        for unit in sample:
            rows, cols = unit["grid"]
            th, tw = target_grid(max(1, int(rows * cols * 0.5 + 0.5)), rows, cols)
            assert len(unit["kept"]) == th * tw


def test_unpatch_is_exact(onevision):
    model, processor, inputs, _ = onevision
    with torch.no_grad():
        before = model(**inputs).logits
        hooks, attributes = hook_count(model), instance_attributes(model)
        handle = vtc.patch(model, "quota", keep=0.5, processor=processor)
        model(**inputs)
        handle.unpatch()
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert hook_count(model) == hooks and instance_attributes(model) == attributes


def test_clear_errors(onevision):
    model, _, _, _ = onevision
    with pytest.raises(ValueError, match="processor"):
        vtc.patch(model, "quota", keep=0.25)
    assert "forward" not in vars(model.model.language_model)
    with pytest.raises(ValueError, match="reduction"):
        vtc.patch(model, "quota", keep=0.25, processor=object(), reduction="nearest")
    with pytest.raises(ValueError, match="scorer_processor="):
        vtc.patch(model, "quota", keep=0.25, processor=object(), scorer_model=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="query= or objects="):
        vtc.patch(model, "quota", keep=0.25, scorer=lambda f, g, p: torch.ones(len(f)))
    assert "forward" not in vars(model.model.language_model)


def test_pre_llm_oracle_onevision(onevision):
    """The unpatched language model on each sample's compacted sequence (text + the resized frame tokens at
    their representatives' original positions) gives the patched logits."""
    model, processor, inputs, _ = onevision
    inner = model.model
    with torch.no_grad():
        with vtc.patched(model, "quota", keep=0.5, processor=processor) as handle:
            patched = model(**inputs).logits
            chosen = handle._last["selections"]["pre_llm"]
            layout = handle.adapter.last_layout
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        video = inputs["input_ids"] == model.config.video_token_id
        features = inner.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
        embeds = embeds.masked_scatter(video[..., None], features.reshape(-1, embeds.shape[-1]))
        for b in range(2):
            positions = video[b].nonzero().squeeze(1)
            keep = inputs["attention_mask"][b].bool().clone()
            row = embeds[b].clone()
            for unit, info in enumerate(layout.extras["units"]):
                if info["sample"] != b:
                    continue
                members = positions[4 * info["frame"] : 4 * info["frame"] + 4]  # a frame: a 2 x 2 pooled grid
                local, merged = chosen[unit]
                keep[members] = False
                keep[members[local]] = True
                row[members[local]] = merged.to(row.dtype)
            rows = keep.nonzero().squeeze(1)
            mask = torch.ones(1, len(rows), dtype=torch.long)
            out = inner.language_model(inputs_embeds=row[rows][None], position_ids=rows[None], attention_mask=mask)
            ref = model.lm_head(out.last_hidden_state)[0]
            assert torch.allclose(patched[b, -len(rows) :], ref, atol=1e-5)


def test_batch_equals_alone(onevision, qwen):
    """Each video is scored in its own forwards: a sample's frames keep the same tokens in a batch and alone."""
    for (model, processor, _, videos), build in ((onevision, "onevision"), (qwen, "qwen")):
        questions = ["What happens?", "Describe the clip in one word."]
        if build == "onevision":
            batch = onevision_video_inputs(processor, questions, videos)
            alone = [onevision_video_inputs(processor, [q], [v]) for q, v in zip(questions, videos)]
        else:
            batch = qwen_inputs(processor, questions, videos=[[v] for v in videos])
            alone = [qwen_inputs(processor, [q], videos=[[v]]) for q, v in zip(questions, videos)]
        with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor) as handle:
            logits = model(**batch).logits
            kept = handle.last_kept("pre_llm")
            for b, single in enumerate(alone):
                one = model(**single).logits
                assert torch.equal(handle.last_kept("pre_llm")[0], kept[b])
                assert torch.allclose(one[0, -1], logits[b, -1], atol=1e-4)


def test_text_only_passes_through(onevision):
    model, processor, _, _ = onevision
    inputs = next_inputs(processor, ["Hello there", "What is a cat?"])
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtc.patched(model, "quota", keep=0.25, processor=processor) as handle:
            assert torch.equal(model(**inputs).logits, ref)
            assert "text-only" in str(handle.report())


def test_separate_scorer_model_onevision(onevision):
    """The paper's setting: a separate scorer VLM (here a tiny Qwen2-VL) asks about each frame as an image."""
    import numpy as np
    from PIL import Image

    model, processor, inputs, videos = onevision
    scorer, scorer_processor = tiny_qwen_vl("qwen2_vl", seed=7), tiny_qwen_processor()
    options = dict(processor=processor, scorer_model=scorer, scorer_processor=scorer_processor, query="What happens?")
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, **options) as handle:
        model(**inputs)
        plan, strategy = handle.strategy.last_plan, handle.strategy
        images = frame_images(model, processor, handle.adapter.last_layout, [p["unit"] for p in plan])
        report = str(handle.report())
    assert "quota (scorer VLM Qwen2VLForConditionalGeneration): 8 frame scoring passes in 2 scorer forwards" in report
    answer = strategy.answer_id(scorer_processor.tokenizer)
    prompt = QUERY_PROMPT.format(query="What happens?")
    for entry, image in zip(plan, images):
        video, frame = divmod(entry["unit"], 4)
        seen = videos[video][frame].convert("RGB").resize(image.size, Image.BICUBIC)  # as onevision_video_inputs
        assert np.array_equal(np.asarray(image), np.asarray(seen))  # the frame the model saw, rebuilt exactly
        one = qwen_inputs(scorer_processor, [prompt], images=[[seen]])
        assert entry["p"] == pytest.approx(_answer_probability(scorer, one, answer), abs=1e-6, rel=1e-4)


def test_separate_scorer_frames_qwen(qwen):
    """Qwen2-VL frames are un-patchified from the processor's patches: the first frame of each temporal patch."""
    import numpy as np

    model, processor, inputs, videos = qwen
    scorer = tiny_qwen_vl("qwen2_vl", seed=7)
    options = dict(processor=processor, scorer_model=scorer, scorer_processor=tiny_qwen_processor())
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, **options) as handle:
        model(**inputs)
        plan = handle.strategy.last_plan
        images = frame_images(model, processor, handle.adapter.last_layout, [p["unit"] for p in plan])
    assert len(plan) == 8 and len({round(p["p"], 12) for p in plan}) > 1
    for entry, image in zip(plan, images):
        video, t = divmod(entry["unit"], 4)
        original = np.asarray(videos[video][2 * t].convert("RGB")).astype(int)
        assert image.size == (QWEN_SIZE[1], QWEN_SIZE[0])
        assert np.abs(np.asarray(image).astype(int) - original).max() <= 1


def test_keep_one_is_identity(onevision):
    model, processor, inputs, _ = onevision
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtc.patched(model, "quota", keep=1.0, processor=processor) as handle:
            out = model(**inputs).logits
            assert "nothing scored" in str(handle.report())
    valid = inputs["attention_mask"].bool()
    assert out.shape == ref.shape and (out - ref)[valid].abs().max() <= 1e-5


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed (.venv-clip)")
def test_clip_scorer_without_open_clip_names_the_extra(onevision):
    model, processor, _, _ = onevision
    options = dict(processor=processor, scorer="clip", clip_model=torch.nn.Linear(1, 1), clip_tokenizer=str.split)
    with pytest.raises(ImportError, match=r"pip install 'vtc-vlm\[clip\]'"):
        vtc.patch(model, "quota", keep=0.25, **options)
    with pytest.raises(ImportError, match="make clip-setup"):
        vtc.patch(
            model,
            "quota",
            keep=0.25,
            processor=processor,
            scorer="clip",
            clip_name="ViT-B-32",
            clip_pretrained="openai",
        )
    assert "forward" not in vars(model.model.language_model)


def test_clip_scorer_bad_arguments(onevision):
    """Checked before open_clip is imported: the same errors with or without the extra."""
    model, processor, _, _ = onevision
    clip = dict(clip_model=torch.nn.Linear(1, 1), clip_tokenizer=str.split)
    cases = [
        (dict(scorer="clop"), "scorer= takes 'clip' or a callable"),
        (dict(clip_name="ViT-B-32"), "clip_name only apply with scorer='clip'"),
        (dict(scorer=lambda f, g, p: torch.ones(len(f)), **clip), "clip_model, clip_tokenizer only apply"),
        (dict(scorer="clip"), "needs clip_model= and clip_tokenizer="),
        (dict(scorer="clip", clip_name="ViT-B-32", **clip), "not both"),
        (dict(scorer="clip", clip_model=torch.nn.Linear(1, 1)), "needs its clip_tokenizer="),
        (dict(scorer="clip", clip_name="ViT-B-32", clip_tokenizer=str.split), "drop clip_tokenizer="),
        (dict(scorer="clip", clip_name="ViT-B-32"), "without clip_pretrained= would build it with random weights"),
        (dict(scorer="clip", scorer_model=torch.nn.Linear(1, 1), scorer_processor=processor, **clip), "pass one"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            vtc.patch(model, "quota", keep=0.25, processor=processor, **options)
    with pytest.raises(ValueError, match=re.escape("needs the model's processor (processor=)")):
        vtc.patch(model, "quota", keep=0.25, scorer="clip", query="What?", **clip)
    assert "forward" not in vars(model.model.language_model)
