"""random, downsample, visionzip, tome, dart, todre: formulas re-stated from the papers / official code, and
the DESIGN.md section 4 invariants on the tiny LLaVA (keep=1 identity, pre-LLM oracle, generate with cache vs
recompute, batch vs alone, realised budgets), plus a visionzip + fastv composition.

Oracles for merging strategies rebuild the merged features independently (re-statements with Python loops,
from the unpatched model's own vision outputs) and run the unpatched language model on them."""

import pytest
import torch

import vtc
from vtc import ops
from vtc.strategies.dart import key_l1_norm, pivot_counts
from vtc.strategies.downsample import band_counts, pooling_plan
from vtc.strategies.random_baseline import random_subset
from vtc.strategies.todre import max_sum_diversify
from vtc.strategies.tome import merge_to_budget
from vtc.strategies.visionzip import contextual_merge, split_budget
from vtc.testing import llava_inputs, tiny_llava

from .helpers import full_embeds, greedy_recompute, kept_rows, pre_llm_oracle_logits, until_eos, upper_layers

N = 36  # tokens per image of the tiny LLaVA (6 x 6 grid)


# ------------------------------------------------------------------------------------------------ unit tests
def test_random_subset_is_seeded_uniform_and_sorted():
    a, b = random_subset(36, 9, 0), random_subset(36, 9, 0)
    assert torch.equal(a, b) and len(a.unique()) == 9 and torch.equal(a, a.sort().values)
    assert not torch.equal(random_subset(36, 9, 0), random_subset(36, 9, 1))
    counts = torch.zeros(10)
    for seed in range(400):
        counts[random_subset(10, 3, seed)] += 1
    assert counts.min() > 80 and counts.max() < 160  # 120 expected per token


def test_downsample_plan_regular_grid_equals_adaptive_avg_pool():
    x = torch.randn(2, 36, 5)
    for k, side in [(9, 3), (4, 2), (36, 6), (1, 1)]:
        reps, weights = pooling_plan(k, 6, 6)
        pooled = torch.einsum("kn,ind->ikd", weights, x)
        grid = x.transpose(1, 2).reshape(2, 5, 6, 6)
        expected = torch.nn.functional.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
        assert torch.allclose(pooled, expected, atol=1e-6)
    assert pooling_plan(4, 4, 4)[0].tolist() == [5, 7, 13, 15]  # 2x2 cells of a 4x4 grid: centre rounded up
    assert pooling_plan(9, 6, 6)[0].tolist() == [7, 9, 11, 19, 21, 23, 31, 33, 35]
    assert pooling_plan(36, 6, 6)[0].tolist() == list(range(36))


@pytest.mark.parametrize("k", [2, 5, 7, 13, 17, 35])
def test_downsample_ragged_plan_gives_exactly_k_distinct_cells(k):
    counts = band_counts(k, 6, 6)
    assert sum(counts) == k and max(counts) - min(counts) <= 1 and max(counts) <= 6
    reps, weights = pooling_plan(k, 6, 6)
    assert len(reps) == k and bool((reps.diff() > 0).all())
    assert torch.allclose(weights.sum(1), torch.ones(k))
    assert bool((weights[torch.arange(k), reps] > 0).all())  # each representative lies in its cell
    assert band_counts(5, 6, 6) == [3, 2]


def test_visionzip_budget_split_matches_official_settings():
    assert split_budget(64) == (54, 10) and split_budget(128) == (108, 20) and split_budget(192) == (162, 30)
    assert split_budget(1) == (1, 0) and split_budget(5, contextual=2) == (3, 2)


def test_visionzip_contextual_merge_hand_case():
    # 5 remaining tokens, 2 contextual: step = 2, targets 0 and 2; tokens 1, 3, 4 join the closer target
    metric = torch.tensor([[[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9], [1.0, 0.05]]])
    features = torch.arange(5.0).view(1, 5, 1)
    targets, merged = contextual_merge(features, metric, 2, "mean")
    assert targets.tolist() == [0, 2]
    assert torch.allclose(merged[0, :, 0], torch.tensor([(0 + 1 + 4) / 3, (2 + 3) / 2]))
    _, official = contextual_merge(features, metric, 2, "official")
    assert torch.allclose(official[0, :, 0], torch.tensor([0 + (1 + 4) / 2, 2 + 3 / 1]))


def tome_restated(x: torch.Tensor, metric: torch.Tensor, k: int):
    """ToMe bipartite soft matching re-stated with Python loops (one image): rounds until k tokens remain."""
    x, metric = [row.clone() for row in x.float()], [row.clone() for row in metric.float()]
    size, index = [1.0] * len(x), list(range(len(x)))
    while len(x) > k:
        n = len(x)
        r = min(n - k, (n + 1) // 2)
        best = []
        for a in range(0, n, 2):
            sims = [float(torch.cosine_similarity(metric[a], metric[b], dim=0, eps=1e-12)) for b in range(1, n, 2)]
            top = max(sims)
            best.append((-top, a, 1 + 2 * sims.index(top)))
        merged_away = sorted(best)[:r]  # highest score first, ties to the lower A index
        # size-weighted average over each group (all sources of a destination at once)
        groups = {}
        for _, a, b in merged_away:
            groups.setdefault(b, []).append(a)
        for b, sources in groups.items():
            members = [b, *sources]
            total = sum(size[m] for m in members)
            x[b] = sum(size[m] * x[m] for m in members) / total
            metric[b] = sum(size[m] * metric[m] for m in members) / total
            size[b] = total
        gone = {a for _, a, _ in merged_away}
        keep = [i for i in range(n) if i not in gone]
        x, metric = [x[i] for i in keep], [metric[i] for i in keep]
        size, index = [size[i] for i in keep], [index[i] for i in keep]
    return torch.tensor(index), torch.stack(x)


@pytest.mark.parametrize("k", [5, 9, 17])
def test_tome_merge_to_budget_equals_restated_tome(k):
    torch.manual_seed(0)
    x, metric = torch.randn(2, 36, 6), torch.randn(2, 36, 4)
    index, merged, size = merge_to_budget(x, metric, k)
    assert index.shape == (2, k) and float(size.sum()) == 72
    for i in range(2):
        expected_index, expected = tome_restated(x[i], metric[i], k)
        assert index[i].tolist() == expected_index.tolist()
        assert torch.allclose(merged[i], expected, atol=1e-5)


def test_dart_pivots_and_norms():
    assert pivot_counts(128, 20) == (4, 4) and pivot_counts(6, 20) == (4, 2) and pivot_counts(3, 20) == (3, 0)
    assert pivot_counts(10, 2) == (4, 2)
    keys = torch.tensor([[[1.0, -2.0], [0.5, 0.5]]])
    assert key_l1_norm(keys).tolist() == [[3.0, 1.0]]


def test_todre_max_sum_equals_brute_force():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 5)
    first = torch.tensor([3, 7])
    got = max_sum_diversify(x, 6, first)
    for i in range(2):
        picked = [int(first[i])]
        for _ in range(5):
            best, best_j = None, None
            for j in range(12):
                if j in picked:
                    continue
                total = sum(1 - float(torch.cosine_similarity(x[i, j], x[i, s], dim=0)) for s in picked)
                if best is None or total > best + 1e-6:
                    best, best_j = total, j
            picked.append(best_j)
        assert got[i].tolist() == picked


# ------------------------------------------------------------------------------------------- model oracles
@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava("llama", seed=11, attn_implementation="eager")


def vision_outputs(model, pixel_values):
    """Feature-layer [CLS] attention summed over heads (I, N), head-mean keys (I, N, d), projected features."""
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    layer_index = model.config.vision_feature_layer + len(encoder.layers)  # -2 -> output of layer L-2
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        layer = encoder.layers[layer_index]
        attn = layer.self_attn
        keys = attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index]))
        images = keys.shape[0]
        keys = keys.view(images, -1, attn.num_heads, attn.head_dim).mean(2)[:, 1:]
        features = torch.stack(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    return out.attentions[layer_index][:, :, 0, 1:].sum(1), keys, features


def visionzip_restated(cls, keys, features, k):
    """Official VisionZip (clip_encoder.py lines 49-80) on one image, [CLS] slot given to a patch, mean merge."""
    dominant_k = k - round(k * 10 / 64)
    contextual = k - dominant_k
    dominant = cls.topk(dominant_k).indices.sort().values
    rest = torch.tensor([i for i in range(len(cls)) if i not in set(dominant.tolist())])
    metric = keys[rest] / keys[rest].norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    groups = {t: [t] for t in targets}
    for j in range(len(rest)):
        if j not in groups:
            sims = torch.stack([metric[j] @ metric[t] for t in targets])
            groups[targets[int(sims.argmax())]].append(j)
    out = {int(i): features[i] for i in dominant}
    for t, members in groups.items():
        out[int(rest[t])] = features[rest[members]].mean(0)
    index = sorted(out)
    return torch.tensor(index), torch.stack([out[i] for i in index])


def merged_oracle_logits(model, inputs, kept, merged, b):
    """Unpatched LM on sample b's compacted sequence with the given visual features at the kept tokens."""
    embeds, visual = full_embeds(model, inputs)
    vis_positions = visual[b].nonzero().squeeze(1)
    embeds = embeds.clone()
    embeds[b, vis_positions[kept[b]]] = merged[b].to(embeds.dtype)
    rows = kept_rows(inputs, visual, kept, b)
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=embeds[b : b + 1, rows],
            position_ids=rows[None],
            attention_mask=torch.ones(1, len(rows), dtype=torch.long),
            use_cache=False,
        )
        return model.lm_head(out.last_hidden_state)[0]


def expected_merges(name, model, inputs, k, options):
    """Per sample: (kept indices into its visual tokens, merged features) re-stated independently."""
    cls, keys, features = vision_outputs(model, inputs["pixel_values"])
    per_image = []
    for i in range(features.shape[0]):
        if name == "visionzip":
            per_image.append(visionzip_restated(cls[i], keys[i], features[i], k))
        elif name == "tome":
            metric = features[i] if options.get("metric") == "features" else keys[i]
            per_image.append(tome_restated(features[i], metric, k))
        else:  # downsample on a regular grid: adaptive average pooling to side x side
            side = int(round(k**0.5))
            grid = features[i].T.reshape(1, -1, 6, 6)
            pooled = torch.nn.functional.adaptive_avg_pool2d(grid, side).flatten(2)[0].T
            per_image.append((pooling_plan(k, 6, 6)[0], pooled))
    visual = inputs["input_ids"] == model.config.image_token_id
    images_per_sample = (visual.sum(1) // N).tolist()
    kept, merged, image = [], [], 0
    for count in images_per_sample:
        parts = per_image[image : image + count]
        kept.append(torch.cat([p[0] + N * j for j, p in enumerate(parts)]))
        merged.append(torch.cat([p[1] for p in parts]))
        image += count
    return kept, merged


MERGING = [("downsample", {}), ("visionzip", {}), ("tome", {}), ("tome", {"metric": "features"})]
SELECTING = [
    ("random", {}),
    ("random", {"seed": 3}),
    ("todre", {"stage2": False}),
    ("todre", {"stage2": False, "diversity": "maxsum"}),
]


def ids(params):
    return [name + "".join(f"-{v}" for v in options.values()) for name, options in params]


@pytest.mark.parametrize("strategy,options", MERGING, ids=ids(MERGING))
def test_merging_strategies_equal_restated_oracle(strategy, options, eager_model, batch3):
    inputs, k = batch3[2], 9
    with torch.no_grad(), vtc.patched(eager_model, strategy, keep=k, **options) as handle:
        out = eager_model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        report = handle.report()
    expected_kept, merged = expected_merges(strategy, eager_model, inputs, k, options)
    assert [s.visual_after_pre_llm for s in report.samples] == [k, k, 2 * k]
    for b in range(3):
        assert kept[b].tolist() == expected_kept[b].tolist()
        oracle = merged_oracle_logits(eager_model, inputs, kept, merged, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-4


@pytest.mark.parametrize("strategy,options", SELECTING, ids=ids(SELECTING))
@pytest.mark.parametrize("keep", [0.25, 5])
def test_selecting_strategies_equal_pre_llm_oracle(strategy, options, keep, llava, batch3):
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(llava, strategy, keep=keep, **options) as handle:
        out = llava(**inputs).logits
        kept = handle.last_kept("pre_llm")
    per_image = keep if isinstance(keep, int) else round(N * keep)
    assert [len(k) for k in kept] == [per_image, per_image, 2 * per_image]
    for b in range(3):
        with torch.no_grad():
            oracle = pre_llm_oracle_logits(llava, inputs, kept, b)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


def test_random_images_of_one_prompt_differ_and_seed_matters(llava, batch3):
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(llava, "random", keep=6) as handle:
        llava(**inputs)
        kept = handle.last_kept()
    first, second = kept[2][:6], kept[2][6:] - N
    assert not torch.equal(first, second)  # two images of sample 2
    assert torch.equal(kept[0], first) and torch.equal(kept[1], first)  # first image of every prompt
    assert torch.equal(kept[0], random_subset(N, 6, 0))


def test_todre_stage1_is_kcenter_seeded_by_cls(eager_model, batch3):
    inputs = batch3[2]
    cls, _, features = vision_outputs(eager_model, inputs["pixel_values"])
    expected = ops.kcenter(features, 6, first=cls.argmax(1)).sort(1).values
    with torch.no_grad(), vtc.patched(eager_model, "todre", keep=6, stage2=False) as handle:
        eager_model(**inputs)
        kept = handle.last_kept("pre_llm")
    assert kept[0].tolist() == expected[0].tolist() and kept[2][6:].tolist() == (expected[3] + N).tolist()


@pytest.mark.parametrize("k,official", [(28, False), (24, True), (17, True)])
def test_dart_selection_equals_official_loop(eager_model, single, k, official):
    """Official get_retained_image_token re-stated (set loop, pivot quota = budget // 8). Default options: a
    budget where it coincides with our exact-budget split (4 image pivots + 8 pivots x 3 = 28 tokens);
    `budget="official", pivot_order="official"`: any budget (24 -> 28 kept, 17 -> 20), the set's order."""
    model, layer = eager_model, 2
    lm = model.model.language_model
    visual = single["input_ids"][0] == model.config.image_token_id
    start = int(visual.nonzero()[0])
    with torch.no_grad():
        ref = model(**single, output_hidden_states=True)
        hidden_in = ref.hidden_states[layer - 1]
        prev = lm.layers[layer - 1]
        keys = prev.self_attn.k_proj(prev.input_layernorm(hidden_in))
        positions = torch.arange(hidden_in.shape[1])[None]
        cos, sin = lm.rotary_emb(hidden_in, positions)
        head_dim = prev.self_attn.head_dim
        k4 = keys.view(1, -1, keys.shape[-1] // head_dim, head_dim)
        half = head_dim // 2
        rotated = torch.cat([-k4[..., half:], k4[..., :half]], -1)
        keys = (k4 * cos[:, :, None] + rotated * sin[:, :, None]).flatten(2)[0]
        last_state = lm.norm(ref.hidden_states[layer])[0]
    norms = keys.abs().sum(-1)
    image = list(range(start, start + N))
    image_pivots = sorted(image, key=lambda i: -float(norms[i]))[:4]
    text_pivots = sorted(range(start + N, len(norms)), key=lambda i: -float(norms[i]))[:4]
    chosen, candidates = set(image_pivots), [i for i in image if i not in image_pivots]
    for pivot in list(set(image_pivots + text_pivots)) if official else image_pivots + text_pivots:
        sims = torch.stack([torch.cosine_similarity(last_state[pivot], last_state[c], dim=0) for c in candidates])
        picks = [candidates[int(i)] for i in (-sims).topk(k // 8).indices]
        chosen.update(picks)
        candidates = [c for c in candidates if c not in picks]
    expected = sorted(i - start for i in chosen)
    options = dict(budget="official", pivot_order="official") if official else {}
    with torch.no_grad(), vtc.patched(model, "dart", keep=k, layer=layer, **options) as handle:
        out = model(**single).logits
        kept = handle.last_kept("final")[0]
        per_layer = handle.report().samples[0].visual_per_layer
    kept_count = 4 + 8 * (k // 8)
    assert kept.tolist() == expected and per_layer == [N, N, kept_count, kept_count]
    rows = (~visual).clone()
    rows[visual.nonzero().squeeze(1)[kept]] = True
    rows = rows.nonzero().squeeze(1)
    with torch.no_grad():
        hidden = upper_layers(lm, layer)(
            inputs_embeds=ref.hidden_states[layer][:, rows],
            position_ids=rows[None],
            attention_mask=torch.ones(1, len(rows), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
    assert (out - model.lm_head(hidden)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------ invariants
IDENTITY = [*MERGING, *SELECTING, ("dart", {})]
ALL = [("downsample", {}), ("visionzip", {}), ("tome", {}), ("random", {}), ("todre", {}), ("dart", {})]
MERGES = ("downsample", "visionzip", "tome")


@pytest.mark.parametrize("strategy,options", IDENTITY, ids=ids(IDENTITY))
def test_keep_one_is_identity(strategy, options, llava, batch3):
    inputs = batch3[2]
    with torch.no_grad():
        ref = llava(**inputs).logits
        with vtc.patched(llava, strategy, keep=1.0, **options):
            out = llava(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert out.shape == ref.shape and (out - ref)[valid].abs().max() <= 1e-5


@pytest.mark.parametrize("strategy,options", ALL, ids=ids(ALL))
def test_generate_with_cache_equals_recompute(strategy, options, llava, batch3):
    """Merging strategies recompute without `reuse_selection`: a frozen selection drops the merged features
    (decoder gap, reported); their pre-LLM choice does not depend on the text, so each step re-selects the same."""
    inputs = batch3[2]
    eos = llava.config.text_config.eos_token_id
    with torch.no_grad(), vtc.patched(llava, strategy, keep=0.25, **options) as handle:
        cached = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        handle.reuse_selection = strategy not in MERGES
        recomputed = greedy_recompute(llava, inputs, 4)
    assert until_eos(cached, eos) == until_eos(recomputed, eos)


@pytest.mark.parametrize("strategy,options", ALL, ids=ids(ALL))
def test_batch_equals_each_sample_alone(strategy, options, llava, processor, batch3):
    questions, images, inputs = batch3
    with torch.no_grad(), vtc.patched(llava, strategy, keep=0.25, **options) as handle:
        out = llava(**inputs).logits
        kept = handle.last_kept()
        for b in range(3):
            alone = llava_inputs(processor, [questions[b]], [images[b]])
            out_b = llava(**alone).logits
            assert torch.equal(handle.last_kept()[0], kept[b])
            assert (out[b, -out_b.shape[1] :] - out_b[0]).abs().max() <= 1e-5


def test_todre_stage_budgets_and_zero_token_stage(llava, batch3):
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(llava, "todre", keep=8) as handle:
        out = llava(**inputs).logits
        report = handle.report()
        final = handle.last_kept("final")
    # 4 decoder layers: task_layer = 2 keeps half, drop_layer = 3 drops everything
    assert [s.visual_per_layer for s in report.samples] == [[8, 8, 4, 0], [8, 8, 4, 0], [16, 16, 8, 0]]
    assert all(len(f) == 0 for f in final) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="task_layer"):
        with torch.no_grad(), vtc.patched(llava, "todre", keep=8, task_layer=3, drop_layer=3):
            llava(**inputs)


def test_pre_llm_then_in_llm_budget_in_a_batch(llava, batch3):
    """Padding slots of a compacted sequence must not carry a dropped token (regression)."""
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(llava, ["vtc_cls", "fastv"], keep=16) as handle:
        llava(**inputs)
        per_layer = [s.visual_per_layer for s in handle.report().samples]
    assert per_layer == [[16, 16, 8, 8], [16, 16, 8, 8], [32, 32, 16, 16]]


def test_visionzip_then_fastv_composition(eager_model, single):
    model, k = eager_model, 16
    with torch.no_grad(), vtc.patched(model, ["visionzip", "fastv"], keep=k) as handle:
        out = model(**single).logits
        pre, final = handle.last_kept("pre_llm")[0], handle.last_kept("final")[0]
        report = handle.report()
        text = str(report)
    assert "visionzip" in text and "fastv" in text
    assert report.samples[0].visual_per_layer == [k, k, k // 2, k // 2]
    expected_kept, merged = expected_merges("visionzip", model, single, k, {})
    assert pre.tolist() == expected_kept[0].tolist() and set(final.tolist()) <= set(pre.tolist())
    # oracle: unpatched LM on the merged, compacted sequence; FastV's choice from its eager attention at layer 1
    embeds, visual = full_embeds(model, single)
    vis_positions = visual[0].nonzero().squeeze(1)
    embeds[0, vis_positions[pre]] = merged[0]
    rows = kept_rows(single, visual, [pre], 0)
    lm = model.model.language_model
    with torch.no_grad():
        ref = lm(
            inputs_embeds=embeds[:, rows],
            position_ids=rows[None],
            attention_mask=torch.ones(1, len(rows), dtype=torch.long),
            output_attentions=True,
            output_hidden_states=True,
            use_cache=False,
        )
    is_vis = visual[0][rows]
    scores = ref.attentions[1][0, :, -1].mean(0)[is_vis]
    chosen = pre[scores.topk(k // 2).indices.sort().values]
    assert final.tolist() == chosen.tolist()
    keep_rows = kept_rows(single, visual, [chosen], 0)
    local = torch.searchsorted(rows, keep_rows)
    with torch.no_grad():
        hidden = upper_layers(lm, 2)(
            inputs_embeds=ref.hidden_states[2][:, local],
            position_ids=keep_rows[None],
            attention_mask=torch.ones(1, len(keep_rows), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
    assert (out - model.lm_head(hidden)).abs().max() <= 1e-4


def test_visionzip_then_fastv_generate_equals_recompute(llava, batch3):
    inputs = batch3[2]
    eos = llava.config.text_config.eos_token_id
    with torch.no_grad(), vtc.patched(llava, ["visionzip", "fastv"], keep=16) as handle:
        cached = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        assert [s.visual_per_layer for s in handle.report().samples][2] == [32, 32, 16, 16]
        handle.reuse_selection = True
        recomputed = greedy_recompute(llava, inputs, 4)
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
