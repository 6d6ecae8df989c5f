"""divprune, fastervlm, vispruner, cdpruner, holov, prumerge_plus (issue 21): each one's selection against a
re-statement of its official selection loop on the same inputs (written here from the official code, plain
loops), and the DESIGN.md section 4 invariants on the tiny LLaVA (keep=1 identity, pre-LLM oracle, generate with
cache vs recompute, batch vs alone). The cross-adapter cells are in tests/test_matrix.py."""

import math

import numpy as np
import pytest
import torch

import vtc
from vtc.testing import llava_inputs, tiny_llava

from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_cached_generate_equals_recompute,
    assert_keep_one_is_identity,
    full_embeds,
    greedy_recompute,
    kept_rows,
    pre_llm_oracle_logits,
    until_eos,
)

NEW = ["divprune", "fastervlm", "vispruner", "cdpruner", "holov"]
N = 36  # tokens per image of the tiny LLaVA (6 x 6)


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava("llama", seed=11, attn_implementation="eager")


def vision_inputs(model, pixel_values):
    """Per image: the feature-layer [CLS] attention per head (I, H, N) and the projected features (I, N, D)."""
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    layer = model.config.vision_feature_layer + len(encoder.layers)
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True)
        features = torch.stack(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    return out.attentions[layer][:, :, 0, 1:], features


def kept_by(model, inputs, strategy, **options):
    with torch.no_grad(), vtc.patched(model, strategy, **options) as handle:
        model(**inputs)
        return handle.last_kept("pre_llm")


# ------------------------------------------------------------------ the official selection loops, re-stated
def divprune_official(x, ratio):
    """vbdi/divprune llava_arch.py `DivPrune`: 1 - cosine, seed = farthest nearest neighbour, then max-min."""
    count = int(round(ratio * x.shape[0]))
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.t()
    picked = []
    for i in range(count):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[picked].min(dim=0).values
        picked.append(int(scores.argmax()))
    return sorted(picked)


def fastervlm_official(attn, count):
    """Theia-4869/FasterVLM llava_arch.py `encode_images`: mean over heads, topk."""
    return sorted(torch.topk(attn.mean(dim=0), count).indices.tolist())


def vispruner_official(attn, x, count, ratio):
    """Theia-4869/VisPruner llava_arch.py `encode_images`, one image."""
    important = int(count * ratio)
    diverse = count - important
    order = attn.mean(dim=0).argsort(descending=True)
    keep, residual = order[:important], order[important:]
    unit = x / x.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(8, len(residual) - diverse)
        if r <= 0:
            break
        a, b = unit[residual[::2]], unit[residual[1::2]]
        scores = (a @ b.t()).max(dim=-1).values
        distinct = scores.argsort(descending=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    return sorted(torch.cat([keep, residual]).tolist() if diverse > 0 else keep.tolist())


def cdpruner_official(x, text, count):
    """Theia-4869/CDPruner llava_arch.py `encode_images`, one image, text embeddings given."""
    unit = (x / x.norm(dim=-1, keepdim=True)).float()
    similarity = unit @ unit.t()
    t = text / text.norm(dim=-1, keepdim=True)
    relevance = (-(unit @ t.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    cis = torch.zeros(count, x.shape[0])
    di2s = kernel.diagonal().clone()
    picked = []
    for i in range(count):
        j = int(di2s.argmax())
        picked.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / di2s[j].sqrt()
        cis[i] = eis
        di2s -= eis.square()
        di2s[j] = -float("inf")
    return sorted(picked)


def holov_official(x, attn, count, parts=16, esp=1e-6):
    """obananas/HoloV llava/model/utils.py `HoloV`, one image, returning the kept indices (no zero padding)."""
    n = x.shape[0]
    size, remainder = n // parts, n % parts
    chunks, start = [], 0
    for p in range(parts):
        length = size + (1 if p < remainder else 0)
        if length > 0:
            chunks.append(list(range(start, start + length)))
        start += length
    scores = []
    for chunk in chunks:
        a = attn[chunk]
        if len(chunk) <= 1:
            scores.append(a.mean())
            continue
        f = x[chunk] / (x[chunk].norm(dim=1, keepdim=True) + esp)
        s = (f @ f.t()) * (1 - torch.eye(len(chunk)))
        mean = s.sum(dim=1) / (len(chunk) - 1)
        var = ((s - mean[:, None]) ** 2).sum(dim=1) / (len(chunk) - 1)
        scaled = a * 1e3
        var = var * (scaled.abs().mean() / (var.abs().mean() + esp))
        scores.append((scaled + 0.09 * var).mean())
    scores = torch.stack(scores)
    weights = scores / (scores.sum() + esp)
    allocated = (weights * count).floor().long()
    remaining = count - int(allocated.sum())
    if remaining > 0:
        for i in torch.topk(weights, k=min(remaining, len(weights))).indices[:remaining]:
            allocated[i] += 1
    kept = []
    for chunk, alloc in zip(chunks, allocated.tolist()):
        if alloc >= len(chunk):
            kept += chunk
        elif alloc > 0:
            kept += [chunk[i] for i in torch.topk(attn[chunk], k=alloc).indices.tolist()]
    return sorted(kept)


def prumerge_plus_official(q, k, x, adaptive=True, reduction_ratio=1 / 8):
    """42Shawn/LLaVA-PruMerge clip_encoder.py `token_prune_merge_advanced_plus`, one image: q, k (1 + N, C) the
    last layer's q_proj / k_proj outputs, x (N, D) the features merged. Returns the kept indices (the official
    order) and their merged features (the appended extra token left out)."""
    n, c = x.shape[0], q.shape[1]
    cls_attn = ((q @ k.t()) * c**-0.5).softmax(dim=-1)[0, 1:]
    if adaptive:
        values = cls_attn.double().numpy()
        q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
        outliers = max(1, len(np.where(values > q3 + 1.5 * (q3 - q1))[0]))  # max(1, .): our documented fallback
        reduction_ratio = outliers / len(values)
    idx = torch.topk(cls_attn, int(n * reduction_ratio)).indices.tolist()
    step = int(1 / reduction_ratio)
    if adaptive:
        sequence = range(0, n - 1, max(1, int(step / 3)))  # max(1, .): our documented fallback
    else:
        sequence = range(int(step / 2), n - 1, step)
    idx += [t for t in sequence if t not in idx]  # (the non-adaptive official path keeps duplicates twice)
    keys = torch.nn.functional.normalize(k[1:], dim=-1)
    merged = []
    for i in idx:
        rest = [j for j in range(n) if j != i]
        sims = keys[i] @ keys[rest].t()
        near = [rest[j] for j in torch.topk(sims, k=32).indices.tolist()]
        merged.append(x[i] + (x[near] * cls_attn[near][:, None]).sum(0))
    return idx, torch.stack(merged)


def last_layer_qk(model, pixel_values):
    """The last vision layer's q_proj and k_proj outputs per image (I, 1 + N, C), as PruMerge's hooks read them."""
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    last = encoder.layers[-1]
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        normed = last.layer_norm1(hidden)
        return last.self_attn.q_proj(normed), last.self_attn.k_proj(normed)


# ----------------------------------------------------------------------------- same input, same selection
@pytest.mark.parametrize("keep", [0.098, 0.25, 0.5])
def test_divprune_equals_official_loop(eager_model, batch3, keep):
    inputs = batch3[2]
    _, features = vision_inputs(eager_model, inputs["pixel_values"])
    kept = kept_by(eager_model, inputs, "divprune", keep=keep)
    images = [kept[0], kept[1], kept[2][: len(kept[2]) // 2], kept[2][len(kept[2]) // 2 :] - N]
    assert [k.tolist() for k in images] == [divprune_official(f, keep) for f in features]


@pytest.mark.parametrize("keep", [6, 0.25])
def test_fastervlm_equals_official_topk(eager_model, single, keep):
    attn, _ = vision_inputs(eager_model, single["pixel_values"])
    count = keep if isinstance(keep, int) else round(N * keep)
    assert kept_by(eager_model, single, "fastervlm", keep=keep)[0].tolist() == fastervlm_official(attn[0], count)


@pytest.mark.parametrize("keep,ratio", [(12, 0.5), (9, 0.75), (16, 0.25), (8, 1.0)])
def test_vispruner_equals_official_loop(eager_model, single, keep, ratio):
    attn, features = vision_inputs(eager_model, single["pixel_values"])
    got = kept_by(eager_model, single, "vispruner", keep=keep, important_ratio=ratio)[0].tolist()
    assert got == vispruner_official(attn[0], features[0], keep, ratio)


@pytest.mark.parametrize("keep", [4, 9, 18])
def test_cdpruner_equals_official_loop(eager_model, batch3, keep):
    """Text embeddings: the LLM's input embeddings of the text after the image (our stand-in for CLIP's text
    tower, see the docstring); the rest is the official formula and DPP loop."""
    inputs = batch3[2]
    _, features = vision_inputs(eager_model, inputs["pixel_values"])
    kept = kept_by(eager_model, inputs, "cdpruner", keep=keep)
    embed = eager_model.model.get_input_embeddings()
    visual = inputs["input_ids"] == eager_model.config.image_token_id
    image = 0
    for b in range(3):
        valid = inputs["attention_mask"][b].bool()
        positions = visual[b].nonzero().squeeze(1)
        for j in range(int(visual[b].sum()) // N):
            last = int(positions[(j + 1) * N - 1])
            after = valid & ~visual[b] & (torch.arange(len(valid)) > last)
            with torch.no_grad():
                text = embed(inputs["input_ids"][b][after])
            expected = cdpruner_official(features[image], text, keep)
            assert kept[b][j * keep : (j + 1) * keep].tolist() == [i + j * N for i in expected]
            image += 1


@pytest.mark.parametrize("keep,parts", [(9, 16), (18, 16), (12, 4), (30, 4)])
def test_holov_equals_official_allocation(eager_model, single, keep, parts):
    """(30, 4): allocations above a partition's size, where the official code pads zeros and we keep fewer."""
    attn, features = vision_inputs(eager_model, single["pixel_values"])
    expected = holov_official(features[0], attn[0].float().mean(0), keep, parts)
    got = kept_by(eager_model, single, "holov", keep=keep, partitions=parts)[0].tolist()
    assert got == expected and len(got) <= keep


def test_holov_overflowing_partition_keeps_whole_and_fewer():
    """Attention concentrated in one partition: its allocation exceeds its size; the official code keeps it whole
    and pads zeros, we keep it whole and keep fewer (the same real tokens)."""
    from vtc.strategies.base import VisualTokens
    from vtc.strategies.holov import HoloV, allocate

    assert allocate(torch.tensor([[10.0, 0.1, 0.1, 0.1]]), 20, torch.ones(1, 4, dtype=torch.bool)).tolist() == [
        [20, 0, 0, 0]
    ]
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, N, 8, generator=g)
    attn = torch.rand(2, 2, N, generator=g) * 1e-3
    attn[:, :, :9] += 1.0  # partition 0 of 4 (9 tokens) dominates
    visual = VisualTokens(features=features, grid=(6, 6), budget=20, cls_attention={3: attn})
    got = HoloV(keep=20, partitions=4).select(visual)  # the same count for both images: indices (2, 9)
    for i in range(2):
        expected = holov_official(features[i], attn[i].mean(0), 20, 4)
        assert len(expected) < 20 and got[i].tolist() == expected
    attn[1, :, :9] -= 1.0  # now only image 0 overflows: the images keep different counts, a keep-mask comes back
    mask = HoloV(keep=20, partitions=4).select(visual)
    assert mask.dtype == torch.bool
    for i in range(2):
        assert mask[i].nonzero().squeeze(1).tolist() == holov_official(features[i], attn[i].mean(0), 20, 4)
    assert int(mask[0].sum()) < 20 == int(mask[1].sum())


@pytest.mark.parametrize("keep", [None, 0.25, 0.5])
def test_prumerge_plus_equals_official(eager_model, batch3, keep):
    """Adaptive (keep=None: IQR outliers + spatial sample) and the official non-adaptive path (a keep); the merged
    features at every kept token equal the official loop's, on the projected features (ours, see the docstring)."""
    inputs = batch3[2]
    q, k = last_layer_qk(eager_model, inputs["pixel_values"])
    _, features = vision_inputs(eager_model, inputs["pixel_values"])
    with torch.no_grad(), vtc.patched(eager_model, "prumerge_plus", keep=keep) as handle:
        eager_model(**inputs)
        chosen = handle._last["selections"]["pre_llm"]  # image -> (kept token ids, their merged features)
    for i in range(4):
        ratio = 1 / 8 if keep is None else round(N * keep) / (2 * N)
        idx, merged = prumerge_plus_official(q[i], k[i], features[i], keep is None, ratio)
        order = sorted(range(len(idx)), key=lambda j: idx[j])
        assert chosen[i][0].tolist() == sorted(set(idx))
        torch.testing.assert_close(chosen[i][1], merged[order], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("strategy", NEW)
def test_keep_one_is_identity(strategy, llava, batch3):
    assert_keep_one_is_identity(llava, batch3[2], strategy)


@pytest.mark.parametrize("strategy", NEW)
@pytest.mark.parametrize("keep", [0.25, 5])
def test_pre_llm_equals_oracle(strategy, keep, llava, batch3):
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(llava, strategy, keep=keep) as handle:
        out = llava(**inputs).logits
        kept = handle.last_kept("pre_llm")
    per_image = keep if isinstance(keep, int) else math.floor(N * keep + 0.5)
    if strategy != "holov":  # HoloV may keep fewer (a partition smaller than its allocation)
        assert [len(k) for k in kept] == [per_image, per_image, 2 * per_image]
    for b in range(3):
        assert torch.equal(kept[b], kept[b].sort().values) and len(kept[b].unique()) == len(kept[b])
        with torch.no_grad():
            oracle = pre_llm_oracle_logits(llava, inputs, kept, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("strategy", NEW)
def test_generate_with_cache_equals_recompute(strategy, llava, batch3):
    assert_cached_generate_equals_recompute(llava, batch3[2], strategy, 4, keep=0.25)


@pytest.mark.parametrize("strategy", NEW)
def test_batch_equals_each_sample_alone(strategy, llava, processor, batch3):
    questions, images, inputs = batch3
    alone = {b: llava_inputs(processor, [questions[b]], [images[b]]) for b in range(3)}
    assert_batch_equals_each_sample_alone(llava, inputs, alone, strategy, keep=0.25, tokens=2)


def test_bad_options_fail_early(llava):
    with pytest.raises(ValueError, match="important_ratio"):
        vtc.patch(llava, "vispruner", important_ratio=1.5)
    with pytest.raises(ValueError, match="partitions"):
        vtc.patch(llava, "holov", partitions=0)
    assert "forward" not in vars(llava.model.language_model)


@pytest.mark.parametrize("keep", [None, 0.5])
def test_prumerge_plus_equals_merged_oracle_and_alone(keep, llava, processor, batch3):
    """Merged features at the kept tokens, the rest dropped: the unpatched LM on that sequence (the oracle); each
    sample alone keeps and merges the same; generate with the cache equals recomputing (the selection does not
    depend on the text, so every step re-selects the same)."""
    questions, images, inputs = batch3
    embeds, visual = full_embeds(llava, inputs)
    eos = llava.config.text_config.eos_token_id
    with torch.no_grad(), vtc.patched(llava, "prumerge_plus", keep=keep) as handle:
        out = llava(**inputs).logits
        kept = handle.last_kept("pre_llm")
        chosen = handle._last["selections"]["pre_llm"]
        cached = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        recomputed = greedy_recompute(llava, inputs, 4)
        for b in range(3):
            one = llava(**llava_inputs(processor, [questions[b]], [images[b]])).logits
            assert torch.equal(handle.last_kept("pre_llm")[0], kept[b])
            assert (out[b, -one.shape[1] :] - one[0]).abs().max() <= 1e-5
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
    image_of_sample = [[0], [1], [2, 3]]
    for b in range(3):
        merged = torch.cat([chosen[i][1] for i in image_of_sample[b]])
        sample = embeds[b : b + 1].clone()
        sample[0, visual[b].nonzero().squeeze(1)[kept[b]]] = merged
        rows = kept_rows(inputs, visual, kept, b)
        with torch.no_grad():
            hidden = llava.model.language_model(
                inputs_embeds=sample[:, rows],
                position_ids=rows[None],
                attention_mask=torch.ones(1, len(rows), dtype=torch.long),
                use_cache=False,
            ).last_hidden_state
        oracle = llava.lm_head(hidden)[0]
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


def test_prumerge_plus_keep_one_and_refusals(llava, batch3):
    assert_keep_one_is_identity(llava, batch3[2], "prumerge_plus")
    from vtc.testing.llava_next import tiny_llava_onevision

    onevision = tiny_llava_onevision("qwen2", seed=23)
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        vtc.patch(onevision, "prumerge_plus")
    assert "forward" not in vars(onevision.model.language_model)


def test_vtc_list_names_every_strategy(capsys):
    """`vtc list` prints every strategy, also those whose default keep is None (p-MoD, PruMerge+: it crashed)."""
    from vtc.cli import main

    main(["list"])
    printed = capsys.readouterr().out
    assert all(f"  {name} " in printed for name in vtc.list_strategies())
    assert "prumerge_plus stage=pre_llm  default keep=None" in printed


def test_dart_official_options_batch_equals_each_sample_alone(llava, processor, batch3):
    """The official pivot order reads each sample's own sequence indices: left padding must not change them."""
    questions, images, inputs = batch3
    alone = {b: llava_inputs(processor, [questions[b]], [images[b]]) for b in range(3)}
    assert_batch_equals_each_sample_alone(
        llava, inputs, alone, "dart", keep=10, budget="official", pivot_order="official", tokens=2
    )
