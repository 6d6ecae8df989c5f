"""pdrop, sparsevlm, hiprune, scope, idpruner, mustdrop: each one's selection compared on the same inputs with a
re-statement of its official selection loop (written here from the official code, cited per test), and the
DESIGN.md section 4 invariants on the tiny LLaVA (keep=1 identity, oracle logits, generate with cache vs
recompute, batch vs alone)."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import vtc
from vtc.testing import llava_inputs

from .helpers import (
    assert_batch_equals_each_sample_alone,
    assert_cached_generate_equals_recompute,
    assert_keep_one_is_identity,
)

N = 36  # visual tokens per image of the tiny LLaVA (6 x 6 grid)


class NormSelector(torch.nn.Module):
    """A stand-in for a trained IDPruner Vision Selector: each token's feature norm."""

    def forward(self, x):
        return x.norm(dim=-1)

    def __repr__(self):
        return "norm"


def ids(params):
    return [name + "".join(f"-{v}" for v in options.values()) for name, options in params]


def run_layers(lm, hidden, positions, start, stop):
    """Decoder layers start..stop-1 of `lm` on one unpadded sample under a causal mask, at `positions`."""
    embeddings = lm.rotary_emb(hidden, positions)
    length = hidden.shape[1]
    mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for layer in lm.layers[start:stop]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
    return hidden


def official_attention(layer, hidden, positions, query_rows, rotary):
    """The official eager attention rows (PyramidDrop's `pdrop_rank_drop`, SparseVLM's attn_logits): the layer's
    input_layernorm, q/k projections, RoPE, q k^T / sqrt(d) under the causal mask, softmax; (heads, Q, L)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)[0]
    length, d = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(length, -1, d).transpose(0, 1)[None]
    k = attn.k_proj(x).view(length, -1, d).transpose(0, 1)[None]
    cos, sin = rotary(hidden, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])[0]
    scores = q[0][:, query_rows] @ k.transpose(1, 2) / math.sqrt(d)
    causal = torch.arange(length)[None, :] > torch.as_tensor(query_rows)[:, None]
    return scores.masked_fill(causal, float("-inf")).softmax(-1)


# ------------------------------------------------------------------------------------------------ pdrop
def pdrop_official(model, inputs, layers, ratios):
    """PyramidDrop's official inference loop (modeling_llama_pdrop.py, `pdrop_forward` / `pdrop_rank_drop`) on one
    sample: after layer l_s - 1, layer l_s's attention of the last instruction token ranks the image tokens, the top
    int(N * ratio_s) stay. Positions stay the original ones (vtc's choice, see the strategy's docstring). Returns the
    kept visual tokens per stage and the final logits."""
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        start = int(visual[0])
        rows = torch.arange(inputs["input_ids"].shape[1])  # current sequence -> original index
        hidden, previous, kept_per_stage = out.hidden_states[layers[0]], layers[0], []
        image = torch.arange(N)  # original image-token ids still present
        for s, layer_index in enumerate(layers):
            hidden = run_layers(lm, hidden, rows[None], previous, layer_index) if s else hidden
            weights = official_attention(lm.layers[layer_index], hidden, rows[None], [len(rows) - 1], lm.rotary_emb)
            scores = weights.mean(0)[0, start : start + len(image)]
            top = scores.topk(int(N * ratios[s])).indices.sort().values
            image = image[top]
            keep = torch.cat([torch.arange(start), start + top, torch.arange(start + len(scores), len(rows))])
            hidden, rows = hidden[:, keep], rows[keep]
            kept_per_stage.append(image.clone())
            previous = layer_index
        hidden = run_layers(lm, hidden, rows[None], previous, len(lm.layers))
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    return kept_per_stage, logits


@pytest.mark.parametrize("keep,layers", [(0.5, None), (0.25, [1, 3]), (0.5, [2])])
def test_pdrop_equals_official_loop(keep, layers, llava, single):
    stages = layers or [1, 2, 3]  # round(L/4), round(L/2), round(3L/4) of the 4-layer tiny decoder
    expected, logits = pdrop_official(llava, single, stages, [keep ** (s + 1) for s in range(len(stages))])
    with torch.no_grad(), vtc.patched(llava, "pdrop", keep=keep, layers=layers) as handle:
        out = llava(**single).logits[0, -1]
        report = handle.report()
        final = handle.last_kept("final")[0]
    counts = [int(N * keep ** (s + 1)) for s in range(len(stages))]
    per_layer = report.samples[0].visual_per_layer
    assert [per_layer[layer] for layer in stages] == counts
    assert final.tolist() == expected[-1].tolist()
    assert (out - logits).abs().max() <= 1e-4


def test_pdrop_int_keep_is_the_first_stage_count(llava, single):
    with torch.no_grad(), vtc.patched(llava, "pdrop", keep=12) as handle:
        llava(**single)
        assert handle.report().samples[0].visual_per_layer == [36, 12, 4, 1]
    with pytest.raises(ValueError, match="increasing"):
        vtc.patch(llava, "pdrop", layers=[3, 1])


# --------------------------------------------------------------------------------------------- sparsevlm
def cluster_and_merge_official(x, cluster_num):
    """SparseVLMs utils.py `cluster_and_merge` (DPC-KNN), transcribed without its 1e-6 tie-breaking noise and
    returning the centres too (as LightCompress's copy does)."""
    n, c = x.shape
    dist = (x[:, None] - x[None]).norm(dim=-1, p=2) / c**0.5
    dist_nearest = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).float()
    dist_max = dist.max()
    parent = (dist * mask + dist_max * (1 - mask)).min(dim=-1).values
    index_down = torch.topk(parent * density, k=cluster_num).indices
    idx_cluster = dist[index_down].argmin(dim=0)
    idx_cluster[index_down] = torch.arange(cluster_num)
    merged = torch.stack([x[idx_cluster == j].mean(0) for j in range(cluster_num)])
    return index_down, merged


def sparsevlm_official(model, inputs, locs, counts, rank_scale=None):
    """SparseVLMs' inference loop (modelling_sparse_llama.py forward + score.py) on one sample: raters from the input
    embeddings; at each pruning layer its rater-averaged attention keeps min(k, n - 1) image tokens of the layer's
    output (`attn_postprocess_topk`; with `rank_scale`, the 2024 `attn_postprocess_rank`: k = int(rank * scale)),
    the top 30% + 1 deleted tokens are clustered (int(m / 10) + 1 clusters) and merged. Cluster tokens sit at their
    centre's place and every token keeps its original position (vtc's choices, see the strategy's docstring).
    Returns the image tokens that reach the last layer and the last logits."""
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        embeds = out.hidden_states[0][0]
        is_visual = inputs["input_ids"][0] == model.config.image_token_id
        text_start = int(is_visual.nonzero()[-1]) + 1
        v_t, t_t = embeds[is_visual], embeds[text_start:]
        m_v_t = (v_t @ t_t.T).softmax(1).mean(0)
        raters = torch.where(m_v_t > m_v_t.mean())[0] + text_start  # original indices
        rows = torch.arange(len(embeds))  # original index of each current slot
        image = rows[is_visual]  # original indices of the image tokens still present
        hidden, previous = out.hidden_states[locs[0]], locs[0]
        for s, loc in enumerate(locs):
            hidden = run_layers(lm, hidden, rows[None], previous, loc)
            rater_rows = torch.searchsorted(rows, raters)
            attn = official_attention(lm.layers[loc], hidden, rows[None], rater_rows, lm.rotary_emb).mean(0)
            vis_cols = torch.searchsorted(rows, image)
            relation = attn[:, vis_cols]  # (raters, n)
            n = len(image)
            if rank_scale is None:
                k = min(counts[s], n - 1)
            else:
                rank = torch.linalg.matrix_rank(relation.float())
                k = n if n - rank == 0 else min(int(rank * rank_scale), n - 1)
            relation = relation.mean(0)
            output = run_layers(lm, hidden, rows[None], loc, loc + 1)[0]
            previous = loc + 1
            if k >= n:
                hidden = output[None]
                continue
            top = relation.topk(k).indices
            deleted = torch.tensor([j for j in range(n) if j not in top.tolist()])
            m = int(len(deleted) * 0.3) + 1
            recycled = deleted[relation[deleted].topk(m).indices]
            centres, merged = cluster_and_merge_official(output[vis_cols[recycled]], int(m / 10) + 1)
            new_image = torch.cat([image[top], image[recycled[centres]]])
            new_values = torch.cat([output[vis_cols[top]], merged])
            order = new_image.argsort()
            image, new_values = new_image[order], new_values[order]
            all_visual = is_visual.nonzero().squeeze(1)
            keep_rows = torch.cat([rows[~torch.isin(rows, all_visual)], image]).sort().values
            new_hidden = output[torch.searchsorted(rows, keep_rows)].clone()
            new_hidden[torch.searchsorted(keep_rows, image)] = new_values
            hidden, rows = new_hidden[None], keep_rows
        hidden = run_layers(lm, hidden, rows[None], previous, len(lm.layers))
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    start = int(is_visual.nonzero()[0])
    return image - start, logits


@pytest.mark.parametrize("keep", [192 / 576, 64 / 576, 0.5])
def test_sparsevlm_equals_official_loop(keep, llava, single):
    from vtc.strategies.sparsevlm import schedule_fractions

    counts = [int(N * f + 0.5) for f in schedule_fractions(keep)]
    expected, logits = sparsevlm_official(llava, single, [0, 1, 2], counts)  # round(l * 4 / 32) of [2, 6, 15]
    with torch.no_grad(), vtc.patched(llava, "sparsevlm", keep=keep) as handle:
        out = llava(**single).logits[0, -1]
        final = handle.last_kept("final")[0]
    assert final.tolist() == expected.tolist()
    assert (out - logits).abs().max() <= 1e-4


def test_sparsevlm_rank_schedule_equals_official_2024_loop(llava, single):
    expected, logits = sparsevlm_official(llava, single, [0, 1, 2], None, rank_scale=2.0)
    with torch.no_grad(), vtc.patched(llava, "sparsevlm", schedule="rank", scale=2.0) as handle:
        out = llava(**single).logits[0, -1]
        final = handle.last_kept("final")[0]
    assert final.tolist() == expected.tolist()
    assert (out - logits).abs().max() <= 1e-4


def test_sparsevlm_official_tables_at_576_tokens():
    from vtc.strategies.sparsevlm import OFFICIAL_TABLES, schedule_fractions

    for retained, table in OFFICIAL_TABLES.items():
        assert [int(576 * f + 0.5) for f in schedule_fractions(retained / 576)] == list(table)
    assert schedule_fractions(1.0) == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------- hiprune, scope, idpruner (pre-LLM)
@pytest.fixture(scope="module")
def eager_llava():
    from vtc.testing import tiny_llava

    return tiny_llava("llama", seed=11, attn_implementation="eager")


def tower_outputs(model, pixel_values):
    """The unpatched CLIP tower's attention maps (output_attentions: the test's oracle, never vtc's way), the
    feature layer index, and the projected features (I, N, D)."""
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    feature_layer = model.config.vision_feature_layer + len(encoder.layers)  # -2 -> output of layer L-2
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True)
        features = torch.stack(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    return out.attentions, feature_layer, features


def hiprune_official(attentions, object_layer, feature_layer, budget, alpha, width):
    """HiPrune's `encode_images` (Danielement321/HiPrune, LLaVA/llava/model/llava_arch.py) on a batch of images:
    global attention (mean over heads and queries, [CLS] column dropped) at HIPRUNE_OBJECT_LAYER - 1 and at the
    feature layer; anchors + 4 neighbours, then deep tokens; one sorted index row per image."""
    deep_attention = attentions[feature_layer].mean(dim=1).mean(dim=1)[:, 1:]
    shallow_attention = attentions[object_layer - 1].mean(dim=1).mean(dim=1)[:, 1:]
    n = deep_attention.shape[1]
    shallow_token_num = round(budget * alpha / 5)
    kept = []
    for i in range(deep_attention.shape[0]):
        anchors = torch.topk(shallow_attention[i].unsqueeze(0), k=shallow_token_num, dim=1)[1]
        shallow = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width], dim=1)
        shallow = torch.unique(shallow.clamp(0, n - 1), sorted=False).unsqueeze(0)
        available = torch.zeros(1, n, dtype=torch.bool).scatter_(1, shallow, 1)
        deep = deep_attention[i] - available.int().squeeze()
        deep_indices = torch.topk(deep.unsqueeze(0), k=budget - shallow.shape[1], dim=1)[1]
        kept.append(torch.sort(torch.cat([shallow, deep_indices], dim=1), dim=1)[0][0])
    return kept


@pytest.mark.parametrize("keep,alpha", [(12, 0.5), (20, 1.0), (9, 0.1)])
def test_hiprune_equals_official_encode_images(keep, alpha, eager_llava, batch3):
    inputs = batch3[2]
    attentions, feature_layer, _ = tower_outputs(eager_llava, inputs["pixel_values"])
    # object layer: round(9 / 24 * 4) = 2 (1-based) of the tiny 4-layer tower, i.e. attentions[1]
    expected = hiprune_official(attentions, 2, feature_layer, keep, alpha, 6)
    with torch.no_grad(), vtc.patched(eager_llava, "hiprune", keep=keep, alpha=alpha) as handle:
        eager_llava(**inputs)
        kept = handle.last_kept("pre_llm")
    assert kept[0].tolist() == expected[0].tolist() and kept[1].tolist() == expected[1].tolist()
    assert kept[2].tolist() == expected[2].tolist() + (expected[3] + N).tolist()


def scope_official(features, k, cls_attn, alpha=1.0):
    """kinredon/SCOPE scope/clip_encoder.py `SCOPE` (COMBINED=multi), transcribed on one image."""
    norm = features / features.norm(dim=-1, keepdim=True)
    cosine = norm @ norm.T
    n = len(features)
    selected, cur_max, picks = torch.zeros(n, dtype=torch.bool), torch.zeros(n), []
    for _ in range(k):
        gains = torch.maximum(torch.zeros(1), cosine.masked_fill(selected[:, None], 0) - cur_max[:, None]).sum(dim=0)
        gains = (gains * cls_attn**alpha).masked_fill(selected, float("-inf"))
        best = int(gains.argmax())
        selected[best] = True
        picks.append(best)
        cur_max = torch.maximum(cur_max, cosine[best])
    return sorted(picks)


@pytest.mark.parametrize("keep,alpha", [(6, 1.0), (0.25, 2.0)])
def test_scope_equals_official_greedy(keep, alpha, eager_llava, batch3):
    inputs = batch3[2]
    attentions, feature_layer, features = tower_outputs(eager_llava, inputs["pixel_values"])
    saliency = attentions[feature_layer][:, :, 0, 1:].sum(1)  # official: attentions[-2], [CLS] row, sum over heads
    k = keep if isinstance(keep, int) else round(N * keep)
    expected = [scope_official(features[i], k, saliency[i], alpha) for i in range(4)]
    with torch.no_grad(), vtc.patched(eager_llava, "scope", keep=keep, alpha=alpha) as handle:
        eager_llava(**inputs)
        kept = handle.last_kept("pre_llm")
    assert [kept[0].tolist(), kept[1].tolist()] == expected[:2]
    assert kept[2].tolist() == expected[2] + [i + N for i in expected[3]]


def idpruner_official(features, raw_scores, k, mmr_lambda=0.5, parallel_k=1):
    """AngelSlim idpruner.py's MMR loop on one image (default similarity and importance functions)."""
    s_min, s_max = raw_scores.min(), raw_scores.max()
    importance = (raw_scores - s_min) / (s_max - s_min + 1e-6)
    norm = features / (features.norm(dim=-1, keepdim=True) + 1e-8)
    similarity = norm @ norm.T
    n = len(features)
    selected, candidates, max_sim = [], torch.ones(n, dtype=torch.bool), torch.full((n,), -2.0)
    while len(selected) < k:
        k_step = min(parallel_k, k - len(selected))
        mmr = importance.clone() if not selected else mmr_lambda * importance - (1 - mmr_lambda) * max_sim
        mmr[~candidates] = -float("inf")
        best = torch.topk(mmr, k=k_step).indices
        selected.extend(best.tolist())
        candidates[best] = False
        max_sim = torch.maximum(max_sim, similarity[:, best].max(dim=1).values)
    return sorted(selected)


@pytest.mark.parametrize("options", [{"mmr_lambda": 0.5}, {"mmr_lambda": 0.8, "parallel_k": 3}])
def test_idpruner_equals_official_mmr_loop(options, eager_llava, batch3):
    inputs = batch3[2]
    _, _, features = tower_outputs(eager_llava, inputs["pixel_values"])
    torch.manual_seed(0)
    selector = torch.nn.Linear(features.shape[-1], 1)  # stands for a trained Vision Selector
    with torch.no_grad():
        expected = [idpruner_official(f, selector(f)[:, 0], 9, **options) for f in features]
    with torch.no_grad(), vtc.patched(eager_llava, "idpruner", keep=9, selector=selector, **options) as handle:
        eager_llava(**inputs)
        kept = handle.last_kept("pre_llm")
        assert "no selector" not in str(handle.report())
    assert [kept[0].tolist(), kept[1].tolist()] == expected[:2]
    assert kept[2].tolist() == expected[2] + [i + N for i in expected[3]]


def test_idpruner_without_selector_warns_and_reports(llava, single):
    with pytest.warns(UserWarning, match="selector"):
        handle = vtc.patch(llava, "idpruner", keep=6)
    try:
        with torch.no_grad():
            llava(**single)
        assert "selector" in str(handle.report())
    finally:
        handle.unpatch()
    with pytest.raises(TypeError, match="callable"):
        vtc.patch(llava, "idpruner", selector="AngelSlim/Qwen2.5-VL-7B-Instruct-Selector")


# ---------------------------------------------------------------------------------------------- mustdrop
def conditional_pooling_official(feat, side, window, fix_r=0, threshold=0.8):
    """LightCompress mustdrop.py `conditional_pooling` (the official local_merge.py with a fixed r) on one image's
    tokens (N, D), no [CLS]: returns the kept token ids (merged windows' last token + unmerged) and the features
    there (window means at the merged windows' last token)."""
    ws = window
    grid = feat.T.reshape(1, -1, side, side)
    g = grid.reshape(1, -1, side // ws, ws, side // ws, ws).permute(0, 2, 4, 1, 3, 5)  # b gh gw c ps_h ps_w
    flat = g.reshape(1, side // ws, side // ws, feat.shape[1], -1)
    sims = torch.nn.functional.cosine_similarity(flat.unsqueeze(-1), flat.unsqueeze(-2), dim=3)
    sims = sims * (1 - torch.eye(ws * ws))
    similarity_map = (sims.sum(-1).sum(-1) / ((ws * ws) * (ws * ws - 1))).reshape(1, -1)
    r = fix_r if fix_r else int(torch.ge(similarity_map, threshold).sum(dim=1).min())
    idxs = similarity_map.topk(r, dim=-1).indices[0]
    windowed = torch.arange(side * side).reshape(side, side).unfold(0, ws, ws).unfold(1, ws, ws).reshape(-1, ws * ws)
    gathered = windowed[idxs]
    keep = torch.ones(side * side, dtype=torch.bool)
    keep[gathered[:, :-1].reshape(-1)] = False
    values = feat.clone()
    values[gathered[:, -1]] = torch.stack([feat[w].mean(0) for w in gathered]) if r else values[gathered[:, -1]]
    kept = keep.nonzero().squeeze(1)
    return kept, values[kept]


def dual_attention_filter_official(attn, global_thr, individual_thr):
    """modelling_sparse_llama.py `dual_attention_filter` on (heads, text, image) attention: kept image indices."""
    attn = attn.mean(dim=0)
    attn_sum = attn.sum(dim=0)
    candidate = (attn_sum < attn_sum.sum(dim=0) * global_thr) & (attn.max(dim=0)[0] < individual_thr)
    return torch.arange(attn.shape[1])[~candidate]


def mustdrop_official(model, inputs, keep_count, locs, global_thr, individual_thr, key_rate=0.08):
    """MustDrop's stages on one sample: window merging with LightCompress's fixed r, the key set by the last CLIP
    layer's [CLS] attention (official keep_rate 0.08), the dual-attention filter after each pruning layer (key tokens
    kept). Merged tokens sit at their window's last token, positions stay original (vtc's choices, see the strategy's
    docstring). Returns the image tokens reaching the last layer and the last logits."""
    lm = model.model.language_model
    attentions, _, features = tower_outputs(model, inputs["pixel_values"])
    fix_r = (N - keep_count) // 8
    kept, values = conditional_pooling_official(features[0], 6, 3, fix_r)
    cls = attentions[-1][0, :, 0, 1:].mean(0)[kept]
    key_set = kept[cls.topk(math.ceil(key_rate * len(kept))).indices]
    with torch.no_grad():
        embeds = lm.embed_tokens(inputs["input_ids"])[0]
        is_visual = inputs["input_ids"][0] == model.config.image_token_id
        visual_rows = is_visual.nonzero().squeeze(1)
        embeds[visual_rows[kept]] = values.to(embeds.dtype)
        start, text_start = int(visual_rows[0]), int(visual_rows[-1]) + 1
        rows = torch.cat([torch.arange(start), start + kept, torch.arange(text_start, len(embeds))])
        hidden, image, previous = embeds[rows][None], kept, 0
        for loc in locs:
            hidden = run_layers(lm, hidden, rows[None], previous, loc)
            text_rows = torch.arange(len(rows) - (len(embeds) - text_start), len(rows))
            weights = official_attention(lm.layers[loc], hidden, rows[None], text_rows, lm.rotary_emb)
            vis_cols = torch.searchsorted(rows, start + image)
            important = dual_attention_filter_official(weights[:, :, vis_cols], global_thr, individual_thr)
            important = torch.unique(torch.cat([important, torch.nonzero(torch.isin(image, key_set)).squeeze(1)]))
            output = run_layers(lm, hidden, rows[None], loc, loc + 1)[0]
            image = image[important]
            keep_rows = torch.cat([torch.arange(start), start + image, torch.arange(text_start, len(embeds))])
            hidden, rows, previous = output[torch.searchsorted(rows, keep_rows)][None], keep_rows, loc + 1
        hidden = run_layers(lm, hidden, rows[None], previous, len(lm.layers))
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    return image, logits


@pytest.mark.parametrize("keep,thresholds", [(12, (0.05, 0.05)), (20, (0.02, 0.04)), (12, (0.001, 0.001))])
def test_mustdrop_equals_official_stages(keep, thresholds, eager_llava, single):
    expected, logits = mustdrop_official(eager_llava, single, keep, [0, 1, 2], *thresholds)  # [2, 6, 10, 14] * 4 / 32
    options = dict(global_thr=thresholds[0], individual_thr=thresholds[1])
    with torch.no_grad(), vtc.patched(eager_llava, "mustdrop", keep=keep, **options) as handle:
        out = eager_llava(**single).logits[0, -1]
        final = handle.last_kept("final")[0]
        pre = handle.last_kept("pre_llm")[0]
    assert len(pre) == N - 8 * ((N - keep) // 8)
    assert final.tolist() == expected.tolist()
    assert (out - logits).abs().max() <= 1e-4


def test_mustdrop_spatial_threshold_is_the_official_adaptive_r(eager_llava, batch3):
    from vtc.strategies.mustdrop import window_similarity

    inputs = batch3[2]
    _, _, features = tower_outputs(eager_llava, inputs["pixel_values"])
    _, similarity = window_similarity(features, (6, 6))
    threshold = float(similarity.median())
    with torch.no_grad(), vtc.patched(eager_llava, "mustdrop", spatial_threshold=threshold, prefill=False) as handle:
        eager_llava(**inputs)
        kept = handle.last_kept("pre_llm")
    for b in range(2):  # r per image (the official code takes the minimum over its batch)
        expected, _ = conditional_pooling_official(features[b], 6, 3, threshold=threshold)
        r = int((similarity[b] >= threshold).sum())
        assert 0 < r < 4 and len(kept[b]) == N - 8 * r and kept[b].tolist() == expected.tolist()


# ------------------------------------------------------------------------------------------ invariants
IDENTITY = [("pdrop", {}), ("sparsevlm", {}), ("hiprune", {}), ("scope", {}), ("mustdrop", {"prefill": False})]
MUSTDROP_FILTERING = ("mustdrop", {"spatial_threshold": 0.5, "global_thr": 0.05, "individual_thr": 0.05})
GENERATE = [
    ("pdrop", {}),
    ("sparsevlm", {}),
    ("sparsevlm", {"schedule": "rank", "scale": 2.0}),
    ("hiprune", {"alpha": 1.0}),
    ("scope", {}),
    ("idpruner", {"selector": NormSelector()}),
    MUSTDROP_FILTERING,
]
BATCH = [*GENERATE[:3], ("pdrop", {"layers": [1, 3]}), *GENERATE[3:]]


@pytest.mark.parametrize("strategy,options", IDENTITY, ids=ids(IDENTITY))
def test_keep_one_is_identity(strategy, options, llava, batch3):
    assert_keep_one_is_identity(llava, batch3[2], strategy, **options)


@pytest.mark.parametrize("strategy,options", GENERATE, ids=ids(GENERATE))
def test_generate_with_cache_equals_recompute(strategy, options, llava, batch3):
    assert_cached_generate_equals_recompute(llava, batch3[2], strategy, 4, keep=0.5, also_uncached=True, **options)


@pytest.mark.parametrize("strategy,options", BATCH, ids=ids(BATCH))
def test_batch_equals_each_sample_alone(strategy, options, llava, processor, batch3):
    questions, images, inputs = batch3
    alone = {b: llava_inputs(processor, [questions[b]], [images[b]]) for b in range(3)}
    assert_batch_equals_each_sample_alone(llava, inputs, alone, strategy, keep=0.5, stop_at_eos=True, **options)
