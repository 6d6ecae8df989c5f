"""dycoke, prunevid, holitom (issue 22): each stage against a re-statement of the official code (written here from
the official repositories, plain loops, on small tensors), the in-LLM selections against eager attention of the
unpatched model, and the DESIGN.md section 4 invariants on the video families (LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL): keep=1 identity, the pre-LLM oracle (the unpatched language model on the compacted sequence
with the merged features at the original positions), generate with the cache == recompute, batch == alone, exact
unpatch. The cross-adapter cells (images too) are in tests/test_matrix.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.strategies.dycoke import ttm_keep
from vtc.strategies.holitom import holitom_video, sequential_pair_merge
from vtc.strategies.prunevid import keep_per_role, prunevid_video, refine_clusters
from vtc.testing.llava_next import (
    make_video,
    onevision_video_inputs,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)
from vtc.testing.qwen2_vl import make_video as make_qwen_video
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl
from vtc.testing.qwen3_vl import qwen3_inputs, tiny_qwen3_processor, tiny_qwen3_vl

from . import test_qwen2_vl as q2
from . import test_qwen3_vl as q3
from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_keep_one_is_identity,
    assert_unpatch_restores_exactly,
    compacted_oracle_logits,
    lm_input_embeds,
    until_eos,
)

STRATEGIES = ["dycoke", "prunevid", "holitom"]
PRE_LLM_ONLY = {"dycoke": {}, "prunevid": {"in_llm": False}, "holitom": {"llm_ratio": 0.0}}


# ------------------------------------------------------------------ the official algorithms, re-stated
def dycoke_official(feat, n, k):
    """KD-TAO/DyCoke llava_arch.py `dycole_ttm` on (F N, D): kept positions per frame (sets)."""
    frames = feat.shape[0] // n
    count = int((1 - k) * n)

    def frame(i):
        return feat[i * n : (i + 1) * n]

    kept = {f: set(range(n)) for f in range(frames)}
    for i in range(0, frames - 1, 2):
        sim = F.cosine_similarity(F.normalize(frame(i), p=2, dim=1), F.normalize(frame(i + 1), p=2, dim=1), dim=1)
        kept[i + 1] = set(sorted(range(n), key=lambda j: (float(sim[j]), j))[:count])
    for i in range(0, frames - 4, 4):
        sim = F.cosine_similarity(frame(i), frame(i + 2), dim=1)
        kept[i + 2] = set(sorted(range(n), key=lambda j: (float(sim[j]), j))[:count])
    return kept


def dpc_official(x, centers, knn):
    """TCFormer's `cluster_dpc_knn` (PruneVid, HoliTom) on (N, C), its 1e-6 density noise replaced by index order:
    (centres by decreasing score, each token's centre slot, distances)."""
    n, c = x.shape
    dist = torch.cdist(x[None].float(), x[None].float())[0] / (c**0.5)
    density = (-(dist.topk(knn, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    biggest = float(dist.max())
    score = []
    for i in range(n):
        denser = [
            float(dist[i, j]) for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)
        ]
        score.append(float(torch.tensor(min(denser) if denser else biggest) * density[i]))
    order = sorted(range(n), key=lambda i: (-score[i], i))[:centers]
    assign = [min(range(centers), key=lambda s: (float(dist[order[s], j]), s)) for j in range(n)]
    for s, i in enumerate(order):
        assign[i] = s
    return order, assign, dist


def refine_official(labels):
    """Visual-AI/PruneVid `refine_clusters` for one video (torch ops as the official code)."""
    idx = torch.tensor(labels)
    n = len(labels)
    refined = idx.clone()
    for label in torch.unique(idx):
        where = (idx == label).nonzero(as_tuple=True)[0].tolist()
        segments, start, prev = [], where[0], where[0]
        for i in where[1:]:
            if i == prev + 1:
                prev = i
            else:
                segments.append((start, prev))
                start = prev = i
        segments.append((start, prev))
        longest = max(e - s + 1 for s, e in segments)
        for s, e in segments:
            if longest == 1 or e - s + 1 != longest:
                refined[s : e + 1] = -1
    i = 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < n and refined[i] == -1:
            i += 1
        end = i - 1
        left_label, left_length, right_label, right_length = None, 0, None, 0
        if start > 0:
            left_label = int(refined[start - 1])
            j = start - 1
            while j >= 0 and refined[j] == left_label:
                j -= 1
            left_length = start - j - 1
        if end < n - 1:
            right_label = int(refined[end + 1])
            j = end + 1
            while j < n and refined[j] == right_label:
                j += 1
            right_length = j - end - 1
        if left_length > right_length:
            new = left_label
        elif right_length > left_length:
            new = right_label
        else:
            new = left_label if left_label is not None else right_label
        refined[start : end + 1] = 0 if new is None else new
    return refined.tolist()


def cluster_official(feat, ratio, knn):
    """`spatial_merge_tokens` (> 14 tokens): [(centre index, mean of its cluster)] in centre-score order."""
    order, assign, _ = dpc_official(feat, int(feat.shape[0] * ratio), knn)
    return [(i, feat[[j for j in range(feat.shape[0]) if assign[j] == s]].mean(0)) for s, i in enumerate(order)]


def prunevid_official(frames, tau=0.8, segment_ratio=0.25, cluster_ratio=0.5, knn=7):
    """`merge_frames_dynamic` on one video (F, N, D), its outputs placed as vtc places them (static tokens in the
    window's first frame at their centre's grid position, dynamic ones at their centre's in their frame):
    (keep (F, N), values (F, N, D), role (F, N): 1 static, 2 dynamic)."""
    n_frames, n, _ = frames.shape
    if n_frames == 1:
        windows = [1]
    else:
        _, assign, _ = dpc_official(frames.mean(dim=1), max(1, int(n_frames * segment_ratio)), min(knn, n_frames))
        labels = refine_official(assign)
        windows, run = [], 1
        for a, b in zip(labels[:-1], labels[1:]):
            windows, run = (windows, run + 1) if a == b else (windows + [run], 1)
        windows.append(run)
    keep = torch.zeros(n_frames, n, dtype=torch.bool)
    role = torch.zeros(n_frames, n, dtype=torch.int8)
    values = frames.clone()
    start = 0
    for w in windows:
        cur = frames[start : start + w]
        if w > 1:
            unit = F.normalize(cur, p=2, dim=-1)
            sim = torch.einsum("wlc,tlc->wtl", unit, unit)
            static = ((sim.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1))) > tau
        else:
            static = torch.zeros(n, dtype=torch.bool)
        groups = [(start, static.nonzero().squeeze(1), cur[:, static].mean(dim=0), 1)]
        groups += [(start + f, (~static).nonzero().squeeze(1), cur[f, ~static], 2) for f in range(w)]
        for frame, where, feat, kind in groups:
            if len(where) == 0:
                continue
            tokens = cluster_official(feat, cluster_ratio, knn) if len(where) > 14 else list(enumerate(feat))
            for i, value in tokens:
                keep[frame, where[i]], role[frame, where[i]], values[frame, where[i]] = True, kind, value
        start += w
    return keep, values, role


def holitom_official(frames, attn, retain, tau=0.8, d_share=0.0, beta=0.6, knn=7, max_window=1024):
    """cokeshao/HoliTom llava_arch.py (`select_static_windows`, `get_static_dynamic_features`, `holitom`, the merge
    helpers) on one video (F, N, D) with attention (F, N), placed as vtc places the tokens: (keep, values)."""
    b, n, _ = frames.shape
    normed = F.normalize(frames, p=2, dim=-1)
    feature_sim = F.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    similarity = torch.ones(b, b, n)
    for start in range(b - 1):
        cum = torch.cumprod(feature_sim[start:] > tau, dim=0)
        similarity[start, start + 1 : start + 1 + len(cum)] = cum
    lengths = (torch.arange(b)[None] - torch.arange(b)[:, None]).clamp(min=0)
    count = (similarity.sum(dim=-1) * lengths).float()
    dp, prev = [0.0] * b, [0] * b
    for i in range(b):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + float(count[j + 1, i])
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], b - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    windows = windows[::-1]
    total = b * n
    ratio = min(retain / ((total - dp[-1]) / total), 1)

    def by_clustering(feat, targets, dist):
        out = []
        for s, t in enumerate(targets):
            members = [
                j
                for j in range(feat.shape[0])
                if j not in targets and min(range(len(targets)), key=lambda c: (float(dist[j, targets[c]]), c)) == s
            ]
            out.append(beta * feat[t] + (1 - beta) * feat[members].mean(0) if members else feat[t])
        return out

    keep = torch.zeros(b, n, dtype=torch.bool)
    values = frames.clone()
    for s, e in windows:
        static = torch.all(feature_sim[s:e] > tau, dim=0) if e > s else torch.zeros(n, dtype=torch.bool)
        dyn = (~static).nonzero().squeeze(1)
        seq = len(dyn)
        dominant = round(math.ceil(seq * ratio) * (1 - d_share))
        contextual = math.ceil(seq * ratio) - dominant
        for f in range(s, e + 1):
            scores = attn[f, dyn]
            top = sorted(range(seq), key=lambda j: (-float(scores[j]), j))[:dominant]
            for j in top:
                keep[f, dyn[j]] = True
            if contextual > 0:
                rest = [j for j in range(seq) if j not in top]
                feat = frames[f, dyn[rest]]
                order, _, dist = dpc_official(feat, contextual, min(knn, contextual))
                targets = sorted(order)
                for t, value in zip(targets, by_clustering(feat, targets, dist)):
                    keep[f, dyn[rest[t]]], values[f, dyn[rest[t]]] = True, value
        if e > s and bool(static.any()):
            where = static.nonzero().squeeze(1)
            feat = frames[s : e + 1, where].mean(dim=0)
            clusters = round(len(where) * ratio)
            if clusters > 0:
                order, _, dist = dpc_official(feat, clusters, min(knn, clusters))
                targets = sorted(order)
                for t, value in zip(targets, by_clustering(feat, targets, dist)):
                    keep[s, where[t]], values[s, where[t]] = True, value
    return keep, values


def holitom_llm_official(hidden, top):
    """HoliTom's inner-LLM loop (modeling_qwen2.py): every non-top token, in order, averaged into its most similar
    top token."""
    hidden = hidden.clone()
    others = [i for i in range(hidden.shape[0]) if i not in top]
    sim = F.cosine_similarity(hidden[others][:, None], hidden[top][None], dim=-1)
    for i, j in enumerate(sim.argmax(dim=1).tolist()):
        hidden[top[j]] = (hidden[top[j]] + hidden[others[i]]) / 2
    return hidden


def synthetic_video(frames=12, side=6, dim=16, cut=5, seed=0):
    """Frames of a scene with a static background and moving tokens, a scene cut at frame `cut`."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    scenes = [torch.randn(n, dim, generator=g) for _ in range(2)]
    moving = torch.rand(n, generator=g) < 0.4
    out = []
    for f in range(frames):
        base = scenes[int(f >= cut)]
        noise = torch.randn(n, dim, generator=g) * torch.where(moving, 1.5, 0.05)[:, None]
        out.append(base + noise)
    return torch.stack(out)


# ------------------------------------------------------------------ stage by stage on small tensors
@pytest.mark.parametrize("frames", [2, 6, 8, 12, 32])
@pytest.mark.parametrize("k", [0.7, 0.5])
def test_dycoke_ttm_equals_official(frames, k):
    x = torch.randn(frames * 36, 16, generator=torch.Generator().manual_seed(frames))
    keep = ttm_keep(x.view(frames, 36, 16), int((1 - k) * 36))
    expected = dycoke_official(x, 36, k)
    assert [set(keep[f].nonzero().squeeze(1).tolist()) for f in range(frames)] == [expected[f] for f in range(frames)]


def test_dycoke_odd_last_frame_stays_whole():
    x = torch.randn(5, 36, 8)
    keep = ttm_keep(x, 10)
    # pairs (0, 1), (2, 3); window (0, 2) as range(0, 5 - 4, 4) = [0]; the official pair loop drops frame 4
    assert keep.sum(1).tolist() == [36, 10, 10, 10, 36]


LABELS = [[0, 0, 1, 1, 0, 2, 2, 2], [1, 0, 1, 0, 1], [2, 2, 2, 2], [0, 1, 2, 3], [3, 1, 1, 3, 3]]


@pytest.mark.parametrize("labels", LABELS)
def test_refine_clusters_equals_official(labels):
    assert refine_clusters(labels) == refine_official(labels)


@pytest.mark.parametrize("seed,frames,side", [(0, 12, 6), (1, 8, 5), (2, 16, 4), (3, 1, 6), (4, 3, 6)])
def test_prunevid_stage1_equals_official(seed, frames, side):
    x = synthetic_video(frames, side, cut=frames // 2, seed=seed)
    keep, merged, role = prunevid_video(x, 0.8, 0.25, 0.5, 7)
    ref_keep, ref_values, ref_role = prunevid_official(x)
    assert torch.equal(keep, ref_keep) and torch.equal(role, ref_role)
    assert torch.allclose(merged[keep], ref_values[keep], atol=1e-5)
    assert torch.equal(merged[~keep], x[~keep])
    if frames >= 8:
        assert bool((role == 1).any()) and keep.sum() < x.shape[0] * x.shape[1]  # static tokens were merged


def test_prunevid_in_llm_keep_equals_official_topk():
    """`VTPWindowCache.process_attention`: int(count alpha) of each window's static and each frame's dynamic tokens."""
    g = torch.Generator().manual_seed(0)
    role = torch.randint(0, 3, (5, 30), generator=g).to(torch.int8)
    scores = torch.rand(5, 30, generator=g)
    for alpha in (0.4, 0.25, 0.9):
        keep = keep_per_role(scores, role, alpha)
        for row in range(5):
            expected = set()
            for kind in (1, 2):
                members = [j for j in range(30) if role[row, j] == kind]
                ranked = sorted(members, key=lambda j: (-float(scores[row, j]), j))
                expected |= set(ranked[: int(len(members) * alpha)])
            assert set(keep[row].nonzero().squeeze(1).tolist()) == expected


@pytest.mark.parametrize(
    "seed,frames,retain,d_share",
    [(0, 12, 0.1, 0.0), (1, 8, 0.25, 0.0), (2, 10, 0.2, 0.5), (3, 1, 0.3, 0.0), (4, 6, 0.15, 0.4)],
)
def test_holitom_outer_llm_equals_official(seed, frames, retain, d_share):
    x = synthetic_video(frames, 6, cut=frames // 2, seed=seed)
    attn = torch.rand(frames, 36, generator=torch.Generator().manual_seed(seed + 10))
    keep, values = holitom_video(x, attn, retain, 0.8, d_share, 0.6, 7, 1024)
    ref_keep, ref_values = holitom_official(x, attn, retain, d_share=d_share)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(values[keep], ref_values[keep], atol=1e-5)
    if frames > 1:
        assert keep.sum() < math.ceil(x.shape[0] * x.shape[1] * retain) * 2


def test_holitom_inner_llm_merge_equals_official_loop():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 12, generator=g)
    kept = torch.zeros(40, dtype=torch.bool)
    top = sorted(torch.randperm(40, generator=g)[:15].tolist())
    kept[top] = True
    expected = holitom_llm_official(hidden, top)
    assert torch.allclose(sequential_pair_merge(hidden, kept)[kept], expected[top], atol=1e-6)


# ------------------------------------------------------------------ the video families
QWEN_SIZE = (56, 84)  # a 2 x 3 merged-token grid per temporal patch


@pytest.fixture(scope="module")
def families():
    """family -> (model, processor, batch inputs, per-sample inputs alone). Two videos of different lengths and
    prompts (left padding)."""
    out = {}
    questions = ["What happens?", "Describe the clip in one word."]
    p = tiny_llava_onevision_processor()
    videos = [make_video(0, frames=8), make_video(1, frames=8)]
    out["llava_onevision"] = (
        tiny_llava_onevision("qwen2", seed=23),
        p,
        dict(onevision_video_inputs(p, questions, videos)),
        [dict(onevision_video_inputs(p, [q], [v])) for q, v in zip(questions, videos)],
    )
    qp = tiny_qwen_processor()
    qvideos = [[make_qwen_video(0, frames=8, size=QWEN_SIZE)], [make_qwen_video(1, frames=6, size=QWEN_SIZE)]]
    for family in ("qwen2_vl", "qwen2_5_vl"):
        out[family] = (
            tiny_qwen_vl(family, seed=24),
            qp,
            dict(qwen_inputs(qp, questions, videos=qvideos)),
            [dict(qwen_inputs(qp, [q], videos=[v])) for q, v in zip(questions, qvideos)],
        )
    p3 = tiny_qwen3_processor()
    videos3 = [[make_qwen_video(0, frames=8, size=(64, 96))], [make_qwen_video(1, frames=6, size=(64, 96))]]
    out["qwen3_vl"] = (
        tiny_qwen3_vl("qwen3_vl", seed=25),
        p3,
        dict(qwen3_inputs(p3, questions, videos=videos3)),
        [dict(qwen3_inputs(p3, [q], videos=[v])) for q, v in zip(questions, videos3)],
    )
    return out


FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# the CI slice: every strategy on one family per test (every family covered); the rest is `slow` (make test-real)
CI_ORACLE = {"dycoke": "qwen2_vl", "prunevid": "qwen3_vl", "holitom": "llava_onevision"}
CI_INVARIANTS = {"dycoke": "qwen2_5_vl", "prunevid": "llava_onevision", "holitom": "qwen3_vl"}


def cells(ci: dict) -> list:
    return [
        pytest.param(
            family, strategy, marks=() if ci[strategy] == family else pytest.mark.slow, id=f"{family}-{strategy}"
        )
        for family in FAMILIES
        for strategy in STRATEGIES
    ]


def _visual_mask(model, inputs) -> torch.Tensor:
    """The tokens vtc counts as visual: video tokens (OneVision: less each video's closing newline token)."""
    ids = inputs["input_ids"]
    visual = ids == model.config.video_token_id
    if type(model).__name__.startswith("LlavaOnevision"):
        last = visual.shape[1] - 1 - visual.flip(1).long().argmax(dim=1)
        visual[torch.arange(ids.shape[0]), last] = False
    return visual


def _embeds_with(full_embeds, visual, layout, chosen):
    """The prompt's embeddings with every unit's merged features written at its kept tokens."""
    embeds = full_embeds.clone()
    where = visual.nonzero()
    for unit, (local, merged) in chosen.items():
        if merged is None:
            continue
        at = where[layout.unit_tokens(unit)[local]]
        embeds[at[:, 0], at[:, 1]] = merged.to(embeds.dtype)
    return embeds


def _unit_features(full_embeds, visual, layout, video_units):
    where = visual.nonzero()
    rows = [where[layout.unit_tokens(u)] for u in video_units]
    return torch.stack([full_embeds[r[:, 0], r[:, 1]] for r in rows])


def _videos(layout):
    """unit lists per video, in order."""
    from vtc.strategies.quota import _video_of

    groups = {}
    for unit in range(len(layout.counts)):
        groups.setdefault(_video_of(layout, unit), []).append(unit)
    return list(groups.values())


def _oracle(family, model, inputs, embeds, kept, b):
    if family == "llava_onevision":
        return compacted_oracle_logits(model, inputs, kept, b, (embeds, _visual_mask(model, inputs)))
    if family == "qwen3_vl":
        full = q3.full_sequence(model, inputs)
        return q3.pre_llm_oracle(model, inputs, {**full, "embeds": embeds}, kept, b)
    _, positions, visual = q2.full_sequence(model, inputs)
    return q2.oracle_logits(model, inputs, (embeds, positions, visual), kept, b)


def _full_embeds(family, model, inputs):
    with torch.no_grad():
        if family == "llava_onevision":
            return lm_input_embeds(model, inputs)
        if family == "qwen3_vl":
            return q3.full_sequence(model, inputs)["embeds"]
        return q2.full_sequence(model, inputs)[0]


@pytest.mark.parametrize("family,strategy", cells(CI_ORACLE))
def test_pre_llm_equals_oracle(family, strategy, families):
    """The patched logits equal the unpatched language model on the compacted sequence (merged features at the kept
    tokens' original positions); DyCoke's and PruneVid's selections equal the official re-statements on the frames'
    features."""
    model, _, inputs, _ = families[family]
    keep = {"dycoke": 0.5, "prunevid": 0.4, "holitom": 0.3}[strategy]
    with torch.no_grad(), vtc.patched(model, strategy, keep=keep, **PRE_LLM_ONLY[strategy]) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        chosen = handle._last["selections"]["pre_llm"]
        layout = handle.adapter.last_layout
    visual = _visual_mask(model, inputs)
    full = _full_embeds(family, model, inputs)
    assert sum(layout.counts) == int(visual.sum())
    for units in _videos(layout):
        assert len(units) > 1
        frames = _unit_features(full, visual, layout, units)
        got = torch.zeros(frames.shape[:2], dtype=torch.bool)
        for row, unit in enumerate(units):
            got[row, chosen[unit][0]] = True
        if strategy == "dycoke":
            n = frames.shape[1]
            expected = dycoke_official(frames.reshape(-1, frames.shape[-1]), n, 1 - keep)
            assert [set(r.nonzero().squeeze(1).tolist()) for r in got] == [expected[f] for f in range(len(units))]
        elif strategy == "prunevid":
            ref_keep, ref_values, _ = prunevid_official(frames.float())
            assert torch.equal(got, ref_keep)
            for row, unit in enumerate(units):
                assert torch.allclose(chosen[unit][1].float(), ref_values[row][ref_keep[row]], atol=1e-5)
        assert got.sum() < got.numel()
    embeds = _embeds_with(full, visual, layout, chosen)
    for b in range(len(kept)):
        with torch.no_grad():
            oracle = _oracle(family, model, inputs, embeds, kept, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-4


def test_holitom_pre_llm_equals_official_on_onevision(families):
    """HoliTom's attention is the SigLIP feature layer's attention received (mean over heads and queries), pooled like
    the frames (`apply_pooling`): from the unpatched tower with eager attention here."""
    model, _, inputs, _ = families["llava_onevision"]
    keep = 0.3
    with torch.no_grad(), vtc.patched(model, "holitom", keep=keep, llm_ratio=0.0) as handle:
        model(**inputs)
        chosen = handle._last["selections"]["pre_llm"]
        layout = handle.adapter.last_layout
        layer = handle.adapter.feature_layer()  # 0-based layer whose output feeds the projector
    visual = _visual_mask(model, inputs)
    full = _full_embeds("llava_onevision", model, inputs)
    inner = model.model
    pixels = inputs["pixel_values_videos"]
    tower = inner.vision_tower
    implementation = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixels.flatten(0, 1), output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = implementation
    received = out.attentions[layer].mean(dim=1).mean(dim=1)  # mean over heads, then over the queries
    side = int(received.shape[-1] ** 0.5)
    pooled = inner.apply_pooling(received[..., None].view(received.shape[0], side * side, 1))
    pooled = pooled.view(pixels.shape[0], pixels.shape[1], -1)
    for v, units in enumerate(_videos(layout)):
        frames = _unit_features(full, visual, layout, units)
        ref_keep, ref_values = holitom_official(frames.float(), pooled[v].float(), keep)
        got = torch.zeros(frames.shape[:2], dtype=torch.bool)
        for row, unit in enumerate(units):
            got[row, chosen[unit][0]] = True
            assert torch.allclose(chosen[unit][1].float(), ref_values[row][ref_keep[row]], atol=1e-5)
        assert torch.equal(got, ref_keep)


@pytest.mark.parametrize("strategy", ["prunevid", "holitom"])
def test_in_llm_selection_equals_eager_attention(strategy, families):
    """The in-LLM stage on LLaVA-OneVision video: the scores equal eager attention rows of the unpatched language model
    on the compacted pre-LLM sequence (PruneVid: max over heads and the queries after the video; HoliTom: the last
    token, mean over heads), and the final kept tokens are the official choice from them."""
    _, processor, inputs, _ = families["llava_onevision"]
    model = tiny_llava_onevision("qwen2", seed=23, attn_implementation="eager")
    layer = 2
    options = {"layer": layer}
    keep = 0.5 if strategy == "prunevid" else 0.4
    with torch.no_grad(), vtc.patched(model, strategy, keep=keep, **options) as handle:
        model(**inputs)
        pre = handle.last_kept("pre_llm")
        final = handle.last_kept("final")
        chosen = handle._last["selections"]["pre_llm"]
        layout = handle.adapter.last_layout
        roles = dict(handle.strategy._roles) if strategy == "prunevid" else None
    visual = _visual_mask(model, inputs)
    embeds = _embeds_with(lm_input_embeds(model, inputs), visual, layout, chosen)
    for b in range(2):
        valid = inputs["attention_mask"][b].bool()
        where = visual[b].nonzero().squeeze(1)
        rows = (valid & ~visual[b]).clone()
        rows[where[pre[b]]] = True
        rows = rows.nonzero().squeeze(1)
        positions = (inputs["attention_mask"][b].cumsum(-1) - 1)[rows]
        with torch.no_grad():
            attn = model.model.language_model(
                inputs_embeds=embeds[b : b + 1, rows],
                position_ids=positions[None],
                attention_mask=torch.ones(1, len(rows), dtype=torch.long),
                output_attentions=True,
            ).attentions[layer - 1][0]
        is_visual = visual[b][rows]
        if strategy == "prunevid":
            after = torch.arange(len(rows)) > is_visual.nonzero().max()
            scores = attn[:, after].amax(dim=0).amax(dim=0)[is_visual]
        else:
            scores = attn[:, -1].mean(dim=0)[is_visual]
        # the sample's kept pre-LLM tokens, unit by unit
        units = [u for u in range(len(layout.counts)) if layout.sample_of_image[u] == b]
        offset, expected = 0, []
        base = layout.starts[units[0]]
        if strategy == "prunevid":
            for unit in units:
                local = chosen[unit][0]
                role = roles[unit][local]
                s = scores[offset : offset + len(local)]
                picked = keep_per_role(s[None], role[None], keep)[0]
                expected += (layout.starts[unit] - base + local[picked]).tolist()
                offset += len(local)
        else:
            count = round(len(scores) * (1 - 0.5))
            order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:count]
            expected = pre[b][sorted(order)].tolist()
        assert final[b].tolist() == sorted(expected)
        assert len(final[b]) < len(pre[b])


@pytest.mark.parametrize("family,strategy", cells(CI_INVARIANTS))
def test_keep_one_is_identity(family, strategy, families):
    model, _, inputs, _ = families[family]
    assert_keep_one_is_identity(model, inputs, strategy)


@pytest.mark.parametrize("family,strategy", cells(CI_INVARIANTS))
def test_generate_with_cache_equals_recompute(family, strategy, families):
    model, _, inputs, _ = families[family]
    eos = model.config.text_config.eos_token_id
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtc.patched(model, strategy, keep=0.3) as handle:
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, prompt:]
        report = handle.report()
        handle.reuse_selection = True
        recomputed = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)[:, prompt:]
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
    for sample in report.samples:
        assert sample.visual_per_layer[-1] < sample.visual_in


@pytest.mark.parametrize("family,strategy", cells(CI_INVARIANTS))
def test_batch_equals_each_sample_alone(family, strategy, families):
    model, _, inputs, alone = families[family]
    assert_batch_equals_each_sample_alone(model, inputs, dict(enumerate(alone)), strategy, stop_at_eos=True, keep=0.3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unpatch_restores_exactly(strategy, families):
    model, _, inputs, _ = families["qwen2_vl"]
    assert_unpatch_restores_exactly(model, inputs, strategy, generate_tokens=2, keep=0.3)


def test_refusals_and_notes(families):
    model, _, inputs, _ = families["llava_onevision"]
    for strategy in ("prunevid", "holitom"):
        with pytest.raises(ValueError, match="fraction keep"):
            vtc.patch(model, strategy, keep=8)
        assert "forward" not in vars(model.model.language_model)
    with pytest.raises(ValueError, match="llm_ratio"):
        vtc.patch(model, "holitom", keep=0.2, llm_ratio=1.5)
    with torch.no_grad(), vtc.patched(model, "prunevid", keep=0.4, layer=3) as handle:
        model(**inputs)
        assert [s.visual_per_layer[2] > s.visual_per_layer[3] for s in handle.report().samples] == [True, True]


# ------------------------------------------------------------------ DyCoke's decode-time KV pruning
def dycoke_decode_official(model, embeds, positions, steps, layer, ratio=0.7, threshold=0.9):
    """KD-TAO/DyCoke's decoding (modeling_qwen2.py) on the unpatched eager language model, one sample: prefill on
    the TTM-compacted sequence, then per step the new token's layer `layer - 1` attention (mean over heads) to the
    visual entries; when its cosine similarity to the last step's is < threshold (or at the first step), layers
    `layer`.. attend to the top int(n (1 - ratio)) visual entries only. Returns (tokens, per-step logits, attended
    visual entries per step)."""
    from transformers import DynamicCache

    lm = model.model.language_model
    visual = positions["visual"]
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)  # positions have gaps: an explicit mask
        out = lm(inputs_embeds=embeds, position_ids=positions["ids"], attention_mask=mask, use_cache=True,
                 past_key_values=cache)
        logits = [model.lm_head(out.last_hidden_state[:, -1])[0]]
    captured = {}
    hook = lm.layers[layer - 1].self_attn.register_forward_hook(lambda m, a, o: captured.__setitem__("w", o[1]))
    tokens, attended, previous = [], [], None
    next_position = int(positions["logical"])
    try:
        for _ in range(steps):
            token = logits[-1].argmax()
            tokens.append(int(token))
            hidden = lm.embed_tokens(token[None, None])
            ids = torch.tensor([[next_position]])
            pe = lm.rotary_emb(hidden, ids)
            k = cache.get_seq_length() + 1
            full = torch.zeros(1, 1, 1, k)
            mask = full
            with torch.no_grad():
                for i, decoder_layer in enumerate(lm.layers):
                    hidden = decoder_layer(
                        hidden, attention_mask=mask, position_embeddings=pe, position_ids=ids,
                        past_key_values=cache, use_cache=True,
                    )
                    if i == layer - 1:
                        row = captured["w"][0].mean(dim=0)[-1, : len(visual)]
                        image = row[visual]
                        prune = previous is None or float(F.cosine_similarity(image, previous, dim=0)) < threshold
                        previous = image
                        count = int(len(image) * (1 - ratio))
                        allowed = torch.ones(k, dtype=torch.bool)
                        if prune:
                            ranked = sorted(range(len(image)), key=lambda j: (-float(image[j]), j))
                            drop = visual.nonzero().squeeze(1)[ranked[count:]]
                            allowed[drop] = False
                        attended.append(int((allowed[: len(visual)] & visual).sum()))
                        mask = torch.zeros(1, 1, 1, k).masked_fill(~allowed, torch.finfo(torch.float32).min)
                logits.append(model.lm_head(lm.norm(hidden)[:, -1])[0])
            next_position += 1
    finally:
        hook.remove()
    return tokens, logits[:steps], attended


def test_dycoke_kv_equals_official_decoding(families):
    """`vtc.patch(model, "dycoke", kv="dycoke")` on one LLaVA-OneVision video: the greedy tokens, per-step logits and
    visual entries attended per step equal the official decoding re-stated on the unpatched eager model."""
    _, processor, _, alone = families["llava_onevision"]
    model = tiny_llava_onevision("qwen2", seed=23, attn_implementation="eager")
    inputs = alone[0]
    steps, layer = 5, 2
    prompt = inputs["input_ids"].shape[1]
    options = dict(kv="dycoke", kv_options={"layer": layer, "ratio": 0.5})
    with torch.no_grad(), vtc.patched(model, "dycoke", keep=0.5, **options) as handle:
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
            min_new_tokens=steps,
        )
        pre = handle.last_kept("pre_llm")[0]
        chosen = handle._last["selections"]["pre_llm"]
        layout = handle.adapter.last_layout
        attended = [int(a[0]) for a in handle.kv_policy.attended]
        assert "dycoke(ratio=0.5" in str(handle.report())
    visual = _visual_mask(model, inputs)
    embeds = _embeds_with(lm_input_embeds(model, inputs), visual, layout, chosen)
    rows = (~visual[0]).clone()
    rows[visual[0].nonzero().squeeze(1)[pre]] = True
    rows = rows.nonzero().squeeze(1)
    positions = {"ids": rows[None], "visual": visual[0][rows], "logical": prompt}
    tokens, logits, expected = dycoke_decode_official(model, embeds[:, rows], positions, steps, layer, ratio=0.5)
    eos = model.config.text_config.eos_token_id
    assert until_eos(out.sequences[:, prompt:], eos) == until_eos(torch.tensor([tokens]), eos)
    got = torch.stack([s[0] for s in out.logits])  # raw logits (min_new_tokens masks eos in the scores)
    assert (got - torch.stack(logits)).abs().max() <= 1e-4
    assert attended == expected[: len(attended)] and len(attended) == steps - 1
    assert min(attended) < len(pre)  # some step attended to a part of the video only


def test_dycoke_kv_refusals(families):
    model, _, inputs, _ = families["llava_onevision"]
    with pytest.raises(ValueError, match="no kv_budget"):
        vtc.patch(model, "dycoke", kv="dycoke", kv_budget=64)
    with pytest.raises(ValueError, match="layers"):
        vtc.patch(model, "dycoke", kv="dycoke", kv_options={"layer": 9})
    assert "forward" not in vars(model.model.language_model)
    with torch.no_grad(), vtc.patched(model, "fastv", keep=0.5, layer=2, kv="dycoke", kv_options={"layer": 2}):
        with pytest.raises(NotImplementedError, match="same entries"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
