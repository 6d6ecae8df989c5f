"""visionzip and tome on the Qwen-VL families (Qwen2-VL, Qwen2.5-VL with window attention, Qwen3-VL with DeepStack),
images and videos, through the adapters' keys probe.

The oracles re-state VisionZip's official Qwen2.5-VL code (github.com/dvlab-research/VisionZip,
Qwen2_5_VL/qwen2_5vl_visionzip.py at commit 68993a3): the last vision block's dense softmax(q k^T / sqrt(d)) (the
eager path: masked to the block's segments), mean over heads, summed over the queries, `view(-1, 4).mean` over the
patches of a merged token, put back in raster order (`reverse_indices`); its rotated keys averaged the same way;
then the selection of `Qwen2_5_VLForConditionalGeneration.forward` (top-k dominant, contextual targets at a stride,
argmax assignment, contextual tokens written at their targets' places, M-RoPE ids of the full sequence compacted).
ToMe's is `tome_restated` (Python loops) on the same keys. The unpatched language model then runs on the compacted
sequence with those features at the original (t, h, w) positions."""

import pytest
import torch

import vtc
from vtc.testing import make_image
from vtc.testing.qwen2_vl import make_video, qwen_inputs, tiny_qwen_processor, tiny_qwen_vl
from vtc.testing.qwen3_vl import qwen3_inputs, tiny_qwen3_processor, tiny_qwen3_vl

from . import test_qwen2_vl as q2
from . import test_qwen3_vl as q3
from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_cached_generate_equals_recompute,
    assert_keep_one_is_identity,
    expected_kept,
    mrope_greedy_recompute,
)
from .test_strategies_extra import tome_restated

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
STRATEGIES = ["visionzip", "tome"]


@pytest.fixture(scope="module")
def models():
    return {
        "qwen2_vl": tiny_qwen_vl("qwen2_vl", seed=1),
        "qwen2_5_vl": tiny_qwen_vl("qwen2_5_vl", seed=1),
        "qwen3_vl": tiny_qwen3_vl("qwen3_vl", seed=1),
    }


@pytest.fixture(scope="module")
def batches():
    """Per family (questions, images, videos, inputs, processor, build): sample 0 one image, sample 1 two images of
    other shapes, sample 2 a 4-frame video (Qwen3-VL: a small image and the video). Left padded."""
    questions = ["What is in the image?", "Compare the pictures.", "How many objects are there? Answer with one word."]
    p2, p3 = tiny_qwen_processor(), tiny_qwen3_processor()
    images2 = [[make_image(0, size=112)], [make_image(1).resize((140, 84)), make_image(2, size=84)], []]
    videos2 = [[], [], [make_video(3)]]
    images3 = [[make_image(0, size=128)], [make_image(1).resize((160, 96)), make_image(2, size=96)]]
    images3.append([make_image(3, 64)])
    videos3 = [[], [], [make_video(4, size=(64, 96))]]
    out = {}
    for family in ("qwen2_vl", "qwen2_5_vl"):
        out[family] = (questions, images2, videos2, qwen_inputs(p2, questions, images2, videos2), p2, qwen_inputs)
    out["qwen3_vl"] = (questions, images3, videos3, qwen3_inputs(p3, questions, images3, videos3), p3, qwen3_inputs)
    return out


# --- the official re-statement ----------------------------------------------------------------------------------
def official_scores_and_keys(model, pixels, grid):
    """Per merged token (raster order over the call's images/frames): the official attention score (sum over
    queries of the mean over heads of the last block's masked softmax, mean over its 4 patches) and keys (rotated,
    mean over its 4 patches and over heads)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    attn = visual.blocks[-1].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, a, k: seen.update(k, args=a), with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(pixels, grid)
    hook.remove()
    hidden = seen.get("hidden_states", seen["args"][0] if seen["args"] else None)
    n = hidden.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # (H, n, d)
        segment = torch.searchsorted(seen["cu_seqlens"][1:].long(), torch.arange(n), right=True)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(segment[:, None] != segment[None, :], float("-inf")).softmax(-1)
        score = probs.mean(dim=0).sum(dim=0).view(-1, 4).mean(dim=-1)
        keys = k.view(k.shape[0], -1, 4, k.shape[-1]).mean(dim=2)
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: the tower ran window by window
        window_index, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        reverse = torch.argsort(window_index)
        score, keys = score[reverse], keys[:, reverse]
    return score, keys.mean(dim=0)


def visionzip_official(score, keys, features, dominant, contextual, merge):
    """The selection of the official `Qwen2_5_VLForConditionalGeneration.forward` on one unit's N tokens: (kept
    indices, their features: dominant ones as they are, contextual ones at their targets)."""
    n = score.shape[0]
    top = torch.topk(score, dominant).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[top] = True
    metric = keys[None][:, ~mask]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, metric.shape[1] // contextual)
    targets = torch.arange(0, metric.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(metric.shape[1]), targets)
    similarity = torch.bmm(metric[:, others], metric[:, targets].transpose(1, 2))
    assign = torch.zeros(1, int(others.sum()), contextual).scatter_(2, similarity.argmax(dim=2)[..., None], 1)
    counts = assign.sum(dim=1)[..., None]
    hidden = features[None][:, ~mask].float()
    aggregated = torch.bmm(assign.transpose(1, 2), hidden[:, others]) / counts.clamp(min=1)
    if merge == "official":
        merged = hidden[:, targets] + aggregated
    else:  # vtc's default: the mean of the target and its tokens
        merged = (hidden[:, targets] + aggregated * counts) / (counts + 1)
    place = (~mask).nonzero(as_tuple=True)[0][targets]
    out = features.clone()
    out[place] = merged[0].to(out.dtype)
    kept = mask.clone()
    kept[place] = True
    kept = kept.nonzero().squeeze(1)
    return kept, out[kept]


def qwen_split(k, n):
    """vtc's (dominant, contextual) on a tower without [CLS]: the official max(int(0.05 N), 1) contextual."""
    contextual = min(max(int(n * 0.05), 1), k - 1) if k > 1 else 0
    return k - contextual, contextual


def restated_selection(model, inputs, embeds, strategy, keep):
    """Per sample: kept indices into its visual tokens (sorted) and the embeddings with the merged features written
    at the kept tokens; every image and every video frame (temporal patch) is a unit with its own budget."""
    config = model.config
    ids = inputs["input_ids"]
    visual = (ids == config.image_token_id) | (ids == config.video_token_id)
    embeds = embeds.clone()
    keep_flat = torch.zeros(ids.shape, dtype=torch.bool)
    for token, pixels, grid_key in (
        (config.image_token_id, "pixel_values", "image_grid_thw"),
        (config.video_token_id, "pixel_values_videos", "video_grid_thw"),
    ):
        if pixels not in inputs:
            continue
        grid = inputs[grid_key]
        score, keys = official_scores_and_keys(model, inputs[pixels], grid)
        where = (ids == token).nonzero()  # (n, 2): the call's merged tokens in the order they fill the prompt
        offset = 0
        for t, h, w in grid.tolist():
            for _ in range(t):
                n = h * w // 4
                rows = where[offset : offset + n]
                features = embeds[rows[:, 0], rows[:, 1]]
                k = expected_kept(keep, n)
                if k >= n:
                    kept, merged = torch.arange(n), features
                elif strategy == "visionzip":
                    kept, merged = visionzip_official(
                        score[offset : offset + n], keys[offset : offset + n], features, *qwen_split(k, n), "mean"
                    )
                else:
                    kept, merged = tome_restated(features, keys[offset : offset + n], k)
                keep_flat[rows[kept, 0], rows[kept, 1]] = True
                embeds[rows[kept, 0], rows[kept, 1]] = merged.to(embeds.dtype)
                offset += n
    kept = [keep_flat[b][visual[b]].nonzero().squeeze(1) for b in range(ids.shape[0])]
    return kept, embeds


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pre_llm_equals_restated_official_oracle(family, strategy, models, batches):
    model, inputs = models[family], batches[family][3]
    keep = 0.5
    with torch.no_grad(), vtc.patched(model, strategy, keep=keep) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        report = handle.report()
    with torch.no_grad():
        full = q3.full_sequence(model, inputs) if family == "qwen3_vl" else q2.full_sequence(model, inputs)
        embeds = full["embeds"] if family == "qwen3_vl" else full[0]
        expected, merged = restated_selection(model, inputs, embeds, strategy, keep)
    assert [len(k) for k in kept] == [s.visual_after_pre_llm for s in report.samples]
    for b in range(3):
        assert kept[b].tolist() == expected[b].tolist()
        with torch.no_grad():
            if family == "qwen3_vl":  # merged tokens carry the DeepStack features of the token whose place they take
                oracle = q3.pre_llm_oracle(model, inputs, {**full, "embeds": merged}, kept, b)
            else:
                oracle = q2.oracle_logits(model, inputs, (merged, *full[1:]), kept, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-4


def test_visionzip_equals_official_qwen25_forward():
    """Same input, same weights: VisionZip's official Qwen2.5-VL forward re-stated (one image, batch 1, its
    0.65 + 0.05 split, `target + mean(assigned)`, contextual tokens written at their targets, the full sequence's
    M-RoPE ids compacted) gives the logits of vtc's visionzip at the same budget with merge='official'."""
    model = tiny_qwen_vl("qwen2_5_vl", seed=7)
    processor = tiny_qwen_processor(max_pixels=28 * 28 * 64)
    inputs = qwen_inputs(processor, ["Describe the picture."], [[make_image(8, size=224)]])
    config = model.config
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds, positions, _ = q2.full_sequence(model, inputs)
        score, keys = official_scores_and_keys(model, inputs["pixel_values"], inputs["image_grid_thw"])
    n = score.shape[0]
    assert n == 64  # 8 x 8 merged tokens; the vision tower's windows are 2 x 2 of them in its windowed layers
    dominant, contextual = int(0.65 * n), max(int(0.05 * n), 1)
    img = (ids[0] == config.image_token_id).nonzero().squeeze(1)
    kept, merged = visionzip_official(score, keys, embeds[0, img], dominant, contextual, "official")
    img_mask = torch.ones(ids.shape[1], dtype=torch.bool)
    img_mask[img] = False
    img_mask[img[kept]] = True
    official_embeds = embeds.clone()
    official_embeds[0, img[kept]] = merged
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=official_embeds[:, img_mask],
            position_ids=positions[:, :, img_mask],
            attention_mask=inputs["attention_mask"][:, img_mask],
            use_cache=False,
        ).last_hidden_state
        official = model.lm_head(hidden)[0]
        with vtc.patched(model, "visionzip", keep=dominant + contextual, merge="official") as handle:
            out = model(**inputs).logits[0]
            assert handle.last_kept("pre_llm")[0].tolist() == kept.tolist()
    assert (out - official).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_keep_one_is_identity(family, strategy, models, batches):
    assert_keep_one_is_identity(models[family], batches[family][3], strategy)


GENERATE = [("qwen2_vl", "visionzip"), ("qwen2_5_vl", "tome"), ("qwen3_vl", "visionzip")]


@pytest.mark.parametrize("family,strategy", GENERATE)
def test_generate_with_cache_equals_recompute(family, strategy, models, batches):
    """The other cells: tests/test_matrix.py (generate with the cache == generate(use_cache=False))."""
    assert_cached_generate_equals_recompute(
        models[family], batches[family][3], strategy, 4, mrope_greedy_recompute, keep=0.5
    )


@pytest.mark.parametrize("family,strategy", [("qwen2_vl", "tome"), ("qwen2_5_vl", "visionzip"), ("qwen3_vl", "tome")])
def test_batch_equals_each_sample_alone(family, strategy, models, batches):
    questions, images, videos, inputs, processor, build = batches[family]
    alone = {b: build(processor, [questions[b]], [images[b]], [videos[b]]) for b in range(3)}
    assert_batch_equals_each_sample_alone(models[family], inputs, alone, strategy, keep=0.5, stop_at_eos=True)


def test_keys_probe_reads_only_the_key_projection(models, batches):
    """tome asks only for keys: the probe computes no queries and no attention (no [CLS] surrogate note)."""
    model, inputs = models["qwen2_vl"], batches["qwen2_vl"][3]
    with torch.no_grad(), vtc.patched(model, "tome", keep=0.5) as handle:
        model(**inputs)
        assert set(handle.adapter._probes) == {"keys"} and handle.adapter.notes == []


def test_visionzip_says_its_split_and_refuses_a_bad_share(models):
    model = models["qwen2_5_vl"]
    with vtc.patched(model, "visionzip", keep=0.7) as handle:
        assert "contextual_share=0.05" in handle.strategy.describe()  # the official Qwen2.5-VL rule
    with pytest.raises(ValueError, match="contextual_share"):
        vtc.patch(model, "visionzip", contextual_share=1.5)
    assert "forward" not in vars(model.model.language_model)
