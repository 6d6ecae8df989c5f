"""evs, vidcom2, fastvid (issue 22): each one's selection against a re-statement of its official code on small
tensors (written here from the official code, plain loops where the official code loops), and the DESIGN.md section 4
invariants on the video families: LLaVA-OneVision (pooled frames), Qwen2-VL and Qwen2.5-VL (temporal patches, M-RoPE),
Qwen3-VL (timestamped frames, DeepStack). On the models, the kept tokens of every video equal the re-statement run on
the very features the unpatched model hands its language model, and the patched logits equal the unpatched language
model on the compacted sequence (merged features at their targets, original positions)."""

import functools

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.strategies.evs import EVS, evs_mask, evs_retained
from vtc.strategies.fastvid import FastVID, context_counts, fastvid_select, segment_sizes
from vtc.strategies.vidcom2 import VidCom2, vidcom2_mask
from vtc.testing import make_image
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
    assert_cached_generate_equals_recompute,
    assert_keep_one_is_identity,
    assert_unpatch_restores_exactly,
    compacted_oracle_logits,
    greedy_recompute,
    mrope_greedy_recompute,
)
from .test_llava_next import lm_inputs

STRATEGIES = ["evs", "vidcom2", "fastvid"]


# ------------------------------------------------------------------ the official code, re-stated
def evs_vllm(embeds, thw, merge, q):
    """vLLM `compute_retention_mask` (vllm/multimodal/evs.py): (T*H*W/merge^2,) bool over the flat video tokens."""
    t, h, w = thw
    x = embeds.reshape(t, h // merge, w // merge, embeds.shape[-1])
    per_frame = (h // merge) * (w // merge)
    dissimilarity = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(x[:1, :, :, 0]), dissimilarity], dim=0)
    flat = dissimilarity.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    retained = max(per_frame, int(per_frame * t * (1 - q)))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:retained]] = True
    return mask


def vidcom2_official(flat, tpf, base):
    """VidCom2 `vidcom2_compression` (token_compressor/vidcom2/vidcom2.py): sorted kept indices into the flat tokens,
    frame by frame as the official `select_outlier_indices` (ties: the lower index, where `topk` is unordered)."""
    variances = flat.var(dim=0, unbiased=False)
    channels = torch.topk(variances, k=int(flat.shape[-1] * 0.5), largest=False).indices
    frames = F.normalize(flat[:, channels].view(-1, tpf, len(channels)), dim=-1)
    video_centre, frame_centre = frames.mean(dim=(0, 1), keepdim=True), frames.mean(dim=1, keepdim=True)

    def kernel(x, c):
        return sum(torch.exp(-((x - c) ** 2).sum(-1) / (2 * 2**k)) for k in range(-3, 2))

    v, f = kernel(frames, video_centre), kernel(frames, frame_centre)
    scores = -v.mean(dim=-1)
    probs = F.softmax((scores - scores.max()) / 0.01, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    kept = []
    for i, k in enumerate((scales * tpf).round().long().clamp(min=1).tolist()):
        s = (v + f)[i].tolist()
        kept += sorted(i * tpf + j for j in sorted(range(tpf), key=lambda j: (s[j], j))[:k])
    return sorted(kept)


def fastvid_official(x, attention, global_features, retain, c, tau, d, p, beta):
    """FastVID's block in `Qwen2Model.forward` (fastvid_llavaonevision/.../modeling_qwen2.py), one video, token by
    token: (kept flat indices, their features). The official uniform noise on the density is replaced by the
    index tie-break vtc documents (a tied token counts as denser than the later ones); c - 1 capped at T - 1."""
    frames, n, dim = x.shape
    g = global_features / global_features.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cuts = set(sorted(range(frames - 1), key=lambda i: (sim[i].item(), i))[: min(c - 1, frames - 1)])
    cuts |= {i for i in range(frames - 1) if sim[i] < tau}
    bounds = [-1, *sorted(cuts), frames - 1]
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    salient_k = retain - int(retain * d)
    context = retain - salient_k
    counts = []
    for length in sizes:
        anchors = (length + p - 1) // p
        counts += [(context * length) // anchors if (length - 1 - j) % p == 0 else 0 for j in range(length)]
    kept = {}  # flat index -> feature
    rest, density = [], []
    for t in range(frames):
        order = sorted(range(n), key=lambda j: (-attention[t, j].item(), j))
        for j in order[:salient_k]:
            kept[t * n + j] = x[t, j]
        others = sorted(order[salient_k:])
        rest.append(others)
        tokens = x[t, others]
        dist = torch.cdist(tokens[None], tokens[None])[0] / dim**0.5
        m = len(others)
        rho = torch.stack([torch.exp(-(torch.sort(dist[i]).values[:4] ** 2).mean()) for i in range(m)])
        far = dist.max()
        delta = []
        for i in range(m):  # distance to the nearest denser token
            denser = [j for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
            delta.append(dist[i, denser].min() if denser else far)
        density.append((torch.stack(delta) * rho).tolist())

    def merge(targets, members):
        """Each member joins its most cosine-similar target; w target + (1 - w) mean, w = max(1/(count+1), beta)."""
        unit = lambda v: v / v.norm()  # noqa: E731
        groups = [[] for _ in targets]
        for m in members:
            groups[max(range(len(targets)), key=lambda i: (unit(m) @ unit(targets[i])).item())].append(m)
        out = []
        for target, group in zip(targets, groups):
            w = max(1 / (len(group) + 1), beta)
            mean = torch.stack(group).mean(0) if group else torch.zeros_like(target)
            out.append(w * target + (1 - w) * mean)
        return out

    def top(t, k):
        return sorted(range(len(rest[t])), key=lambda i: (-density[t][i], i))[:k]

    start = 0
    for length in sizes:
        for t in range(start, start + length):
            if counts[t] == context and context > 0:  # merged within its own frame
                picked = top(t, context)
                merged = merge([x[t, rest[t][i]] for i in picked], [x[t, j] for j in rest[t]])
                kept.update({t * n + rest[t][i]: v for i, v in zip(picked, merged)})
        if length > 1:
            k = min(counts[start + length - 1], n - salient_k)
            members = [x[s, j] for s in range(start, start + length) for j in rest[s]]
            for t in range(start, start + length):
                if counts[t] > context and k > 0:  # an anchor frame: the whole segment merges into its targets
                    picked = top(t, k)
                    merged = merge([x[t, rest[t][i]] for i in picked], members)
                    kept.update({t * n + rest[t][i]: v for i, v in zip(picked, merged)})
        start += length
    index = sorted(kept)
    return index, torch.stack([kept[i] for i in index]), sizes


# ------------------------------------------------------------------ selections vs the re-statements
@pytest.mark.parametrize("q", [0.25, 0.5, 0.75, 0.9, 0.0])
@pytest.mark.parametrize("static", [False, True])
def test_evs_equals_vllm_retention_mask(q, static):
    torch.manual_seed(0)
    frames, h, w, dim = 5, 4, 6, 8
    x = torch.randn(frames, h * w, dim)
    if static:  # frames 1 and 2 repeat frame 0 in places: zero dissimilarity ties, resolved by the stable sort
        x[1, :10], x[2, :10] = x[0, :10], x[0, :10]
    keep = 1 - q  # vtc's keep is the retention rate
    expected = evs_vllm(x.reshape(-1, dim), (frames, 2 * h, 2 * w), 2, q)
    ours = evs_mask(x, evs_retained(h * w, frames, keep))
    assert torch.equal(ours.reshape(-1), expected)
    assert ours[0].all()  # the first frame whole


def test_evs_budget_rules():
    assert evs_retained(16, 4, 0.25) == 16  # int(64 * 0.25) = 16
    assert evs_retained(16, 4, 0.1) == 16  # int(6.4) = 6 < one frame: the first frame is always kept
    assert evs_retained(16, 10, 0.5) == 80
    assert evs_retained(16, 4, 5) == 20  # an int keep: tokens per frame on average
    assert evs_retained(16, 1, 0.25) == 16  # one frame: nothing to compare with


@pytest.mark.parametrize("base", [0.1, 0.25, 0.5])
def test_vidcom2_equals_official(base):
    torch.manual_seed(1)
    frames, n, dim = 6, 20, 16
    x = torch.randn(frames, n, dim) + torch.randn(frames, 1, dim) * torch.linspace(0.2, 2, frames)[:, None, None]
    ours = vidcom2_mask(x, base).reshape(-1).nonzero().squeeze(1).tolist()
    assert ours == vidcom2_official(x.reshape(-1, dim), n, base)


def test_fastvid_segments_and_anchor_budgets():
    g = torch.tensor([[1.0, 0], [1, 0.05], [0, 1], [0, 1], [0.05, 1], [1, 1], [1, 0]])
    # similarities of neighbours: .999, .05, 1, .999, .74, .71: the 2 lowest gaps cut (c = 3), and those below tau
    assert segment_sizes(g, 3, 0.5) == [2, 4, 1]
    assert segment_sizes(g, 3, 0.75) == [2, 3, 1, 1]
    assert segment_sizes(g, 8, 0.0) == [1] * 7  # c - 1 above the 6 gaps: every gap cuts
    assert segment_sizes(g[:1], 8, 0.9) == [1]
    # C = 4; L = 5, p = 4: anchors at j = 4 and 0, each 4 * 5 // 2 = 10; L = 1: C
    assert context_counts([5, 1, 2], 4, 4) == [10, 0, 0, 0, 10, 4, 0, 8]


@pytest.mark.parametrize(
    "retain,c,tau,p,multi", [(6, 3, 0.5, 2, True), (5, 2, -1.0, 4, True), (8, 8, 0.9, 4, False), (1, 3, 0.5, 2, False)]
)
def test_fastvid_equals_official(retain, c, tau, p, multi):
    torch.manual_seed(2)
    frames, n, dim = 9, 16, 8
    scenes = torch.randn(3, dim)
    which = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = scenes[which][:, None] + 0.7 * torch.randn(frames, n, dim)
    attention = torch.rand(frames, n)
    g = x.mean(dim=1)
    mask, merged, sizes = fastvid_select(x, attention, g, retain, c, tau, 0.4, p, 0.6)
    index, features, official_sizes = fastvid_official(x, attention, g, retain, c, tau, 0.4, p, 0.6)
    assert sizes == official_sizes
    assert mask.reshape(-1).nonzero().squeeze(1).tolist() == index
    assert torch.allclose(merged.reshape(-1, dim)[index], features, atol=1e-5)
    if multi:  # a multi-frame segment: its anchor frames merged the whole segment
        assert any(s > 1 for s in sizes) and len(index) < frames * retain + frames


# ------------------------------------------------------------------ the video families
KEEP = {"onevision": 0.75, "qwen2_vl": 0.5, "qwen2_5_vl": 0.5, "qwen3_vl": 0.5}  # OneVision: 2 x 2 pooled frames
OPTIONS = {"fastvid": {"c": 3, "tau": 0.5, "p": 2}}  # 4 frames: segments of more than one frame
QUESTIONS = ["What happens?", "Describe the clip."]
# the CI slice: every strategy on one family per test (every family covered); the rest is `slow` (make test-video-all)
CI_ORACLE = {"evs": "qwen2_vl", "vidcom2": "qwen3_vl", "fastvid": "onevision"}
CI_INVARIANTS = {"evs": "qwen3_vl", "vidcom2": "onevision", "fastvid": "qwen2_5_vl"}
CI_UNPATCH = {"evs": "onevision", "vidcom2": "qwen3_vl", "fastvid": "onevision"}


def cells(ci: dict, families=tuple(KEEP)) -> list:
    return [
        pytest.param(
            family, strategy, marks=() if ci[strategy] == family else pytest.mark.slow, id=f"{strategy}-{family}"
        )
        for strategy in STRATEGIES
        for family in families
    ]


@pytest.fixture(scope="module")
def families():
    """Per family: (model, batch of two one-video prompts (left padded), per-sample inputs, recompute)."""
    out = {}
    processor = tiny_llava_onevision_processor()
    videos = [make_video(0, frames=4), make_video(1, frames=4)]
    keys = ("pixel_values_videos",)
    out["onevision"] = (
        tiny_llava_onevision("qwen2", seed=23),
        dict(onevision_video_inputs(processor, QUESTIONS, videos)),
        {b: dict(onevision_video_inputs(processor, [QUESTIONS[b]], [videos[b]])) for b in range(2)},
        functools.partial(greedy_recompute, vision_keys=keys),
    )
    processor = tiny_qwen_processor()
    videos = [make_qwen_video(0, frames=8, size=(84, 112)), make_qwen_video(1, frames=8, size=(84, 112))]
    for family in ("qwen2_vl", "qwen2_5_vl"):
        out[family] = (
            tiny_qwen_vl(family, seed=24),
            qwen_inputs(processor, QUESTIONS, videos=[[videos[0]], [videos[1]]]),
            {b: qwen_inputs(processor, [QUESTIONS[b]], videos=[[videos[b]]]) for b in range(2)},
            mrope_greedy_recompute,
        )
    processor = tiny_qwen3_processor()
    videos = [make_qwen_video(0, frames=8, size=(64, 96)), make_qwen_video(1, frames=8, size=(64, 96))]
    out["qwen3_vl"] = (
        tiny_qwen3_vl("qwen3_vl", seed=25),
        qwen3_inputs(processor, QUESTIONS, videos=[[videos[0]], [videos[1]]]),
        {b: qwen3_inputs(processor, [QUESTIONS[b]], videos=[[videos[b]]]) for b in range(2)},
        mrope_greedy_recompute,
    )
    return out


def _strategy(name, keep):
    cls = {"evs": EVS, "vidcom2": VidCom2, "fastvid": FastVID}[name]
    return cls(keep=keep, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("family,strategy", cells(CI_INVARIANTS))
def test_keep_one_is_identity(family, strategy, families):
    model, inputs, _, _ = families[family]
    assert_keep_one_is_identity(model, inputs, strategy)


@pytest.mark.parametrize("family,strategy", cells(CI_ORACLE))
def test_selection_equals_official_and_logits_equal_oracle(family, strategy, families):
    """Per video, the kept tokens (and merged features) equal the re-statement run on the features the unpatched
    model gives its language model; the patched logits equal the unpatched language model on the compacted sequence
    (merged features at their targets' places, original (t, h, w) / 1-D positions)."""
    model, inputs, _, _ = families[family]
    keep = KEEP[family]
    instance = _strategy(strategy, keep)
    received = {}  # unit -> attention score (mean over heads) as the strategy saw it (fastvid)
    select = instance.select

    def recording(visual):
        for row, unit in enumerate(visual.image_index.tolist()):
            for value in visual.received_attention.values():
                received[unit] = value[row].float().mean(0)
        return select(visual)

    instance.select = recording
    with torch.no_grad(), vtc.patched(model, instance) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        layout = handle.adapter.last_layout
        chosen = handle._last["selections"]["pre_llm"]
        report = handle.report()
    with torch.no_grad():
        if family == "onevision":
            embeds, visual = lm_inputs(model, inputs)
        elif family == "qwen3_vl":
            full = q3.full_sequence(model, inputs)
            embeds, visual = full["embeds"], full["visual"]
        else:
            full = q2.full_sequence(model, inputs)
            embeds, visual = full[0], full[2]
    assert sum(layout.counts) == int(visual.sum())
    where = visual.nonzero()
    merged_embeds = embeds.clone()
    for b in range(2):
        units = [u for u, s in enumerate(layout.sample_of_image) if s == b]
        n, frames = layout.counts[units[0]], len(units)
        x = embeds[b][visual[b]].view(frames, n, -1).float()
        if strategy == "evs":
            expected = evs_vllm(x.reshape(frames * n, -1), (frames, *layout.grids[units[0]]), 1, 1 - keep)
            expected = expected.nonzero().squeeze(1).tolist()
        elif strategy == "vidcom2":
            expected = vidcom2_official(x.reshape(frames * n, -1), n, keep)
        else:
            attention = torch.stack([received[u] for u in units])
            retain = max(1, int(n * keep + 0.5))
            expected, features, _ = fastvid_official(x, attention, x.mean(1), retain, 3, 0.5, 0.4, 2, 0.6)
            flat = where[layout.starts[units[0]] + torch.tensor(expected)]
            merged_embeds[flat[:, 0], flat[:, 1]] = features.to(embeds.dtype)
        assert kept[b].tolist() == expected
        assert 0 < len(kept[b]) < frames * n
        assert report.samples[b].visual_after_pre_llm == len(kept[b])
    if strategy == "fastvid":  # the strategy's merged features are the re-statement's
        for unit, (ids, values) in chosen.items():
            flat = where[layout.starts[unit] + ids]
            assert torch.allclose(values.float(), merged_embeds[flat[:, 0], flat[:, 1]].float(), atol=1e-5)
    for b in range(2):
        with torch.no_grad():
            if family == "onevision":
                oracle = compacted_oracle_logits(model, inputs, kept, b, (merged_embeds, visual))
            elif family == "qwen3_vl":
                oracle = q3.pre_llm_oracle(model, inputs, {**full, "embeds": merged_embeds}, kept, b)
            else:
                oracle = q2.oracle_logits(model, inputs, (merged_embeds, *full[1:]), kept, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-4


@pytest.mark.parametrize("family,strategy", cells(CI_INVARIANTS))
def test_generate_with_cache_equals_recompute(family, strategy, families):
    model, inputs, _, recompute = families[family]
    assert_cached_generate_equals_recompute(
        model, inputs, strategy, 3, recompute, keep=KEEP[family], **OPTIONS.get(strategy, {})
    )


@pytest.mark.parametrize("family,strategy", cells(CI_INVARIANTS))
def test_batch_equals_each_sample_alone(family, strategy, families):
    model, inputs, alone, _ = families[family]
    assert_batch_equals_each_sample_alone(
        model, inputs, alone, strategy, stop_at_eos=True, keep=KEEP[family], **OPTIONS.get(strategy, {})
    )


@pytest.mark.parametrize("family,strategy", cells(CI_UNPATCH, ("onevision", "qwen3_vl")))
def test_unpatch_restores_exactly(family, strategy, families):
    model, inputs, _, _ = families[family]
    assert_unpatch_restores_exactly(model, inputs, strategy, generate_tokens=2, keep=KEEP[family])


def test_evs_refuses_images_and_frames_option_treats_pictures_as_frames(families):
    model, _, _, _ = families["qwen2_vl"]
    processor = tiny_qwen_processor()
    images = qwen_inputs(processor, ["What is in the image?"], images=[[make_image(0, size=84)]])
    with torch.no_grad(), vtc.patched(model, "evs", keep=0.5):
        with pytest.raises(ValueError, match="prunes video frames only"):
            model(**images)
    with torch.no_grad(), vtc.patched(model, "evs", keep=1.0) as handle:  # nothing to prune: images pass
        model(**images)
        assert handle.report().samples[0].visual_after_pre_llm == handle.report().samples[0].visual_in
    pictures = qwen_inputs(
        processor, ["Which changed?"], images=[[make_image(0, size=84), make_image(0, size=84), make_image(1, size=84)]]
    )
    with torch.no_grad(), vtc.patched(model, "evs", keep=0.5, frames="sample") as handle:
        model(**pictures)
        (plan,) = handle.strategy.last_plan
    # three 3 x 3 pictures as one video: 27 tokens, int(13.5) = 13 kept; the first whole, the repeat drops all
    assert plan["kept"] == [9, 0, 4]
    with pytest.raises(ValueError, match="frames must be one of"):
        vtc.patch(model, "vidcom2", frames="clip")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_internvl_video_frames_per_sample(strategy):
    """InternVL receives a video's frames as single-tile pictures: with frames="sample" the selection runs over the
    sample's frames as one video, equals the re-statement, and the logits equal the compacted oracle; a batch of two
    clips of different lengths gives each sample what it gets alone (checked for fastvid, the one with merging)."""
    from vtc.testing.internvl import internvl_video_inputs, tiny_internvl, tiny_internvl_processor
    from vtc.testing.internvl import make_video as make_internvl_video

    from .helpers import lm_input_embeds

    processor, model = tiny_internvl_processor(), tiny_internvl("qwen2", seed=26)
    clips = [make_internvl_video(0, frames=4, size=48), make_internvl_video(1, frames=3, size=48)]
    inputs = dict(internvl_video_inputs(processor, QUESTIONS, clips))
    options = dict(keep=0.5, frames="sample", **OPTIONS.get(strategy, {}))
    instance = _strategy(strategy, 0.5)
    instance.frames = "sample"
    received, select = {}, instance.select

    def recording(visual):
        for row, unit in enumerate(visual.image_index.tolist()):
            for value in visual.received_attention.values():
                received[unit] = value[row].float().mean(0)
        return select(visual)

    instance.select = recording
    with torch.no_grad(), vtc.patched(model, instance) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        layout = handle.adapter.last_layout
    embeds = lm_input_embeds(model, inputs)
    visual = inputs["input_ids"] == model.config.image_token_id
    merged_embeds, where = embeds.clone(), visual.nonzero()
    for b in range(2):
        units = [u for u, s in enumerate(layout.sample_of_image) if s == b]
        n, frames = layout.counts[units[0]], len(units)
        x = embeds[b][visual[b]].view(frames, n, -1).float()
        if strategy == "evs":
            expected = evs_vllm(x.reshape(frames * n, -1), (frames, *layout.grids[units[0]]), 1, 0.5)
            expected = expected.nonzero().squeeze(1).tolist()
        elif strategy == "vidcom2":
            expected = vidcom2_official(x.reshape(frames * n, -1), n, 0.5)
        else:
            attention = torch.stack([received[u] for u in units])
            retain = max(1, int(n * 0.5 + 0.5))
            expected, features, _ = fastvid_official(x, attention, x.mean(1), retain, 3, 0.5, 0.4, 2, 0.6)
            flat = where[layout.starts[units[0]] + torch.tensor(expected)]
            merged_embeds[flat[:, 0], flat[:, 1]] = features.to(embeds.dtype)
        assert kept[b].tolist() == expected
        with torch.no_grad():
            oracle = compacted_oracle_logits(model, inputs, kept, b, (merged_embeds, visual))
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-4
    if strategy == "fastvid":
        alone = {b: dict(internvl_video_inputs(processor, [QUESTIONS[b]], [clips[b]])) for b in range(2)}
        assert_batch_equals_each_sample_alone(model, inputs, alone, strategy, stop_at_eos=True, **options)
