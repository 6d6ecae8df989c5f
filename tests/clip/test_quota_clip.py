"""QuoTA with open_clip as its frame scorer (scorer="clip"): runs in .venv-clip (`make clip-test`), skipped elsewhere.

The tiny open_clip model has random weights, built from a config (vtc.testing.clip); nothing is downloaded. Each
frame's score is checked against an independent computation (CLIP's image and text encoders on the frames the VLM
saw, cosine by hand), the per-frame budgets against QuoTA's allocation of those scores, and the invariants (keep=1
identity, exact unpatch, generate with the cache == recompute from the same selection) on LLaVA-OneVision and
Qwen2-VL video: both families' transformers classes import beside torchvision in this venv.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")  # the `clip` extra (make clip-setup)

import vtc  # noqa: E402
from vtc.adapters.llava_next import kept_by_unit  # noqa: E402
from vtc.strategies.quota import frame_budgets, frame_images, target_grid  # noqa: E402
from vtc.testing.clip import TINY_CLIP, tiny_open_clip  # noqa: E402
from vtc.testing.llava_next import (  # noqa: E402
    make_video,
    onevision_video_inputs,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)
from vtc.testing.qwen2_vl import make_video as make_qwen_video  # noqa: E402
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl  # noqa: E402

from ..helpers import hook_count, instance_attributes  # noqa: E402
from ..test_quota import QWEN_SIZE, _cache_vs_recompute  # noqa: E402
from ..test_readme import BLOCKS, ROOT  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip(seed=3)


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


def _options(clip, processor, **more):
    model, tokenizer, preprocess = clip
    return dict(processor=processor, scorer="clip", clip_model=model, clip_tokenizer=tokenizer, **more)


def _oracle(clip, images, text: str) -> list[float]:
    """max(0, cos(image embedding, text embedding)) per image, straight from open_clip's encoders."""
    model, tokenizer, preprocess = clip
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text = model.encode_text(tokenizer([text]))
    return torch.nn.functional.cosine_similarity(image, text, dim=-1).clamp(min=0).tolist()


def test_scores_budgets_and_kept_tokens_onevision(onevision, clip):
    model, processor, inputs, videos = onevision
    with (
        torch.no_grad(),
        vtc.patched(model, "quota", keep=0.5, **_options(clip, processor, query="What happens?")) as h,
    ):
        model(**inputs)
        plan, units, report = h.strategy.last_plan, kept_by_unit(h, "pre_llm"), str(h.report())
        size = frame_images(model, processor, h.adapter.last_layout, [0])[0].size
    assert "quota (clip CLIP): 8 frame scoring passes in 2 scorer forwards" in report
    # the frames the model saw: each decoded frame resized by the processor (checked exactly in test_quota.py)
    for video in range(2):
        frames = [f.convert("RGB").resize(size, Image.BICUBIC) for f in videos[video]]
        entries = [p for p in plan if p["video"] == ("video", video)]
        expected = _oracle(clip, frames, "What happens?")
        assert [p["p"] for p in entries] == pytest.approx(expected, abs=1e-5)
        # QuoTA's allocation of those scores: 4 frames of 2 x 2 tokens, keep 0.5 -> 8 tokens per video
        assert [p["budget"] for p in entries] == frame_budgets(expected, 8, 4)
        th_tw = [target_grid(p["budget"], 2, 2) for p in entries]
        assert [len(u["kept"]) for u in units[video]] == [th * tw for th, tw in th_tw]
    assert len({round(p["p"], 6) for p in plan}) > 2  # the scores differ between frames


def test_scores_from_objects_qwen(qwen, clip):
    """Qwen2-VL: one unit per temporal patch, scored on its first frame; the text is the objects, comma-joined."""
    model, processor, inputs, videos = qwen
    options = _options(clip, processor, objects=["cat", "ball"])
    with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, **options) as handle:
        model(**inputs)
        plan = handle.strategy.last_plan
        images = frame_images(model, processor, handle.adapter.last_layout, [p["unit"] for p in plan])
    assert set(handle.strategy.last_prompts.values()) == {"cat, ball"}
    for entry, image in zip(plan, images):  # the un-patchified frame is the decoded frame (rounding aside)
        video, t = divmod(entry["unit"], 4)
        original = np.asarray(videos[video][2 * t].convert("RGB")).astype(int)
        assert np.abs(np.asarray(image).astype(int) - original).max() <= 1
    expected = _oracle(clip, images, "cat, ball")
    assert [p["p"] for p in plan] == pytest.approx(expected, abs=1e-5)
    # 4 temporal patches of 2 x 3 tokens, keep 0.5: 12 tokens per video
    assert [p["budget"] for p in plan] == frame_budgets(expected[:4], 12, 6) + frame_budgets(expected[4:], 12, 6)
    assert [p["kept"] for p in plan] == [th * tw for th, tw in (target_grid(p["budget"], 2, 3) for p in plan)]


def test_name_loads_a_local_checkpoint(onevision, clip, tmp_path):
    """clip_name= (+ clip_pretrained=, here a checkpoint file, as a cached one) scores as the model object does."""
    model, processor, inputs, _ = onevision
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(clip[0].state_dict(), checkpoint)
    plans = []
    for options in (
        _options(clip, processor),
        dict(processor=processor, scorer="clip", clip_name=TINY_CLIP, clip_pretrained=str(checkpoint)),
    ):
        with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, query="What happens?", **options) as handle:
            model(**inputs)
            plans.append(handle.strategy.last_plan)
    assert [p["p"] for p in plans[1]] == pytest.approx([p["p"] for p in plans[0]], abs=1e-6)
    assert [p["budget"] for p in plans[1]] == [p["budget"] for p in plans[0]]


def test_keep_one_is_identity_and_unpatch_exact(onevision, clip):
    model, processor, inputs, _ = onevision
    with torch.no_grad():
        ref = model(**inputs).logits
        hooks, attributes = hook_count(model), instance_attributes(model)
        with vtc.patched(model, "quota", keep=1.0, **_options(clip, processor)) as handle:
            out = model(**inputs).logits
            assert "nothing scored" in str(handle.report())
        valid = inputs["attention_mask"].bool()
        assert out.shape == ref.shape and (out - ref)[valid].abs().max() <= 1e-5
        handle = vtc.patch(model, "quota", keep=0.5, **_options(clip, processor))
        pruned = model(**inputs).logits
        handle.unpatch()
        after = model(**inputs).logits
    assert pruned.shape[1] < ref.shape[1]  # the patched forward did prune
    assert torch.equal(ref, after)
    assert hook_count(model) == hooks and instance_attributes(model) == attributes


def test_generate_cache_equals_recompute_qwen(qwen, clip):
    model, processor, inputs, _ = qwen
    _cache_vs_recompute(model, inputs, _options(clip, processor), keep=0.25)


def test_readme_clip_example_runs(tmp_path):
    """The README's scorer="clip" example (left to this venv by tests/test_readme.py) runs as written."""
    (code,) = [block for block in BLOCKS if 'scorer="clip"' in block]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"README example failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
    assert "clip" in done.stdout
