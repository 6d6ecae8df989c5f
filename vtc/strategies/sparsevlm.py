"""SparseVLM: text-guided visual token sparsification inside the LLM, with token recycling.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025,
arXiv:2410.04417 (github.com/Gumpest/SparseVLMs: `llava/model/language_model/modelling_sparse_llama.py`,
`score.py`, `utils.py`; the same algorithm in ModelTC/LightCompress `llmc/compression/token_reduction/sparsevlm.py`).

As in the official code (its default, `USE_VERSION=1_0`):
- Text raters (paper section 3.2), once, on the LLM's input embeddings: M = V T^T between the visual tokens V and
  the text tokens after the image T, softmax over the text, mean over the visual tokens; the raters are the text
  tokens whose mean exceeds the mean over all text tokens.
- At each pruning layer (official `pruning_loc` [2, 6, 15] of the 32-layer LLaVA-1.5 decoder, scaled to the
  model's depth: round(l L / 32)), that layer's attention (softmax over the causal row, from its q/k, mean over
  heads) is averaged over the raters' rows; the top min(k_s, n - 1) visual tokens stay (n: visual tokens alive),
  and the layer's output goes on with them (vtc: "before layer l + 1", so `prune_layers` are l + 1).
- Token recycling (paper section 3.4): of the deleted tokens, the int(0.3 d) + 1 the raters attend to most are
  clustered by DPC-KNN (k = number of clusters, distances ||x_i - x_j|| / sqrt(D)) into int(m / 10) + 1 clusters
  (`cluster_and_merge`), each cluster averaged into one token that goes on with the kept ones.
- The schedule k_s: the official tables for 64 / 96 / 128 / 192 retained tokens of 576
  ([66, 30, 17], [238, 48, 26], [303, 110, 36], [300, 200, 110]), as fractions of the image's tokens.

`keep` is the retained budget of those tables as a fraction of the image's tokens (192 / 576 = 1/3, 128 / 576, ...):
at those four values the official schedule is used exactly; between them the per-layer fractions are interpolated
linearly (ours: the official code has only the four tables), towards all tokens at keep = 1 (no pruning: the
identity) and towards no token at keep -> 0. An int keep is read as keep / N.
`layers=` takes the official `pruning_loc` indices: 0-based decoder layers whose OUTPUT is pruned (at most L - 2).

Where we differ from the official code, and why:
- A recycled cluster token takes the place (and the original position id) of its cluster centre, among the kept
  tokens in raster order; the official code appends the cluster tokens after the kept visual tokens and renumbers
  every position 0..n-1 (vtc keeps original positions; the official SparseVLM+ code, `USE_VERSION=2_0`, keeps
  them too).
- DPC-KNN adds 1e-6 random noise to the densities to break ties; we do not (deterministic: ties -> lower index).
- Raters are the valid text tokens after a sample's last visual token (multi-image samples and left padding);
  the official inference code handles one image per sample, batch 1.
- The 2024 release's rank-based count (k = min(int(rank(P) * 13.5), n - 1), P the raters x visual attention, at
  layers [2, 6, 15, 19]) is `schedule="rank"` (`scale`, `bias`); its counts differ per image.
- Attention rows are computed in fp32 from q/k (SDPA stays on), not in the model dtype.
- Needs a pre-LLM stage that keeps every token (it computes the raters from the LLM input), so it cannot be
  composed after another pre-LLM strategy.
"""

from __future__ import annotations

import torch

from ..probes import decoder_attention_rows
from .base import Strategy, VisualTokens, register_strategy, top_k_sorted

OFFICIAL_LAYERS = (2, 6, 15)  # pruning_loc of the 32-layer decoder (the layer whose output is pruned)
RANK_LAYERS = (2, 6, 15, 19)  # the 2024 release (rank-based counts)
OFFICIAL_TABLES = {  # retained tokens of 576 -> tokens kept after each pruning layer (score.py, sparse_token_dict)
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}


def schedule_fractions(keep: float) -> list[float]:
    """Fractions of an image's tokens kept after each official pruning layer, for a retained fraction `keep`."""
    points = [(0.0, (0.0, 0.0, 0.0))] + [(r / 576, tuple(t / 576 for t in ts)) for r, ts in OFFICIAL_TABLES.items()]
    points.append((1.0, (1.0, 1.0, 1.0)))
    for (x0, f0), (x1, f1) in zip(points, points[1:]):
        if x0 <= keep <= x1:
            w = (keep - x0) / (x1 - x0)
            return [a + w * (b - a) for a, b in zip(f0, f1)]
    raise ValueError(f"keep={keep} outside (0, 1]")


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the official rater choice (modelling_sparse_llama.py, "Select Text Raters"): softmax over the text
    of V T^T, mean over the visual tokens, above its own mean."""
    relevance = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)
    return relevance > relevance.mean()


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering and averaging (official `cluster_and_merge`, without its tie-breaking noise), batched:
    x (I, m, D) -> (centre index into m (I, c), cluster means (I, c, D))."""
    images, m, dim = x.shape
    x = x.float()
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / dim**0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    higher = density[:, None, :] > density[:, :, None]  # [i, j]: j is denser than i
    far = distance.flatten(1).max(dim=-1).values[:, None, None]
    parent_distance = torch.where(higher, distance, far).min(dim=-1).values
    centres = (parent_distance * density).topk(clusters, dim=-1).indices  # (I, c)
    assign = distance.gather(1, centres[..., None].expand(-1, -1, m)).argmin(dim=1)  # (I, m)
    rows = torch.arange(images, device=x.device)[:, None]
    assign[rows, centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(images, clusters, dim, device=x.device).scatter_add(1, assign[..., None].expand(-1, -1, dim), x)
    counts = torch.zeros(images, clusters, device=x.device).scatter_add(
        1, assign, torch.ones_like(assign, dtype=x.dtype)
    )
    return centres, sums / (counts[..., None] + 1e-6)


@register_strategy
class SparseVLM(Strategy):
    name = "sparsevlm"
    aliases = ("sparse_vlm",)
    stage = "pre_llm"  # a pass-through pre-LLM stage reads the LLM input (the raters); the pruning is in-LLM
    paper = "Zhang et al., ICML 2025, arXiv:2410.04417"
    default_keep = 192 / 576
    needs_keys = True  # the in-LLM probe carries the input of the layer before each stage (the raters' rows)

    def __init__(
        self,
        keep: float | int = 192 / 576,
        layers: list[int] | tuple[int, ...] | None = None,
        recycle: bool = True,
        schedule: str = "official",
        scale: float = 13.5,
        bias: float = 0.0,
    ):
        super().__init__(keep)
        if schedule not in ("official", "rank"):
            raise ValueError("schedule must be 'official' (the fixed tables) or 'rank' (the 2024 rank-based counts)")
        self.layers = None if layers is None else [int(x) for x in layers]
        self.recycle, self.schedule = bool(recycle), schedule
        self.scale, self.bias = float(scale), float(bias)
        self._stages: list[int] = []
        self._raters: torch.Tensor | None = None  # (B, T) over each sample's valid text tokens, in order

    # --- layers and budgets ---------------------------------------------------------------------
    def prune_layers(self, num_layers: int) -> list[int]:
        official = RANK_LAYERS if self.schedule == "rank" else OFFICIAL_LAYERS
        layers = self.layers or sorted({int(x * num_layers / 32 + 0.5) for x in official})
        if self.layers is None and self.schedule == "official" and len(layers) < 3:
            raise ValueError(f"sparsevlm's three pruning layers do not fit a {num_layers}-layer decoder: pass layers=")
        self._stages = [layer + 1 for layer in layers]  # the layer's output is pruned: before layer l + 1
        return list(self._stages)

    def describe(self) -> str:
        rule = "official tables" if self.schedule == "official" else f"rank x {self.scale} + {self.bias}"
        return f"sparsevlm(keep={self.keep:.3g}, {rule}, recycle={self.recycle})"

    def _fraction(self, n_original: int) -> float:
        return self.keep / n_original if isinstance(self.keep, int) else float(self.keep)

    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        if stage == "pre_llm" or self._fraction(n_original) >= 1.0:
            return n_alive
        if self.schedule == "rank":
            return -1  # per image, from the rank of its raters' attention (select)
        s = self._stages.index(stage)
        count = int(n_original * schedule_fractions(self._fraction(n_original))[min(s, 2)] + 0.5)
        return max(0, min(count, n_alive - 1))

    # --- selection ------------------------------------------------------------------------------
    def select(self, visual: VisualTokens):
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if visual.stage == "pre_llm":
            self._raters = self._choose_raters(visual.context["sequence"])
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        relevance, rows = self._relevance(visual)
        if self.schedule == "rank":
            return self._select_by_rank(visual, relevance, rows)
        kept = top_k_sorted(relevance, k)
        if not self.recycle or k == n:
            return kept
        return self._recycle(visual.features, relevance, kept)

    def _choose_raters(self, seq) -> torch.Tensor:
        is_visual = seq.vis_index >= 0
        is_text = ~is_visual & seq.valid
        index = torch.arange(is_visual.shape[1], device=is_visual.device)
        last_visual = torch.where(is_visual, index, -1).max(dim=1).values
        raters = torch.zeros(is_text.shape, dtype=torch.bool, device=is_text.device)
        for b in range(is_text.shape[0]):  # per sample (different text and image counts): not per token
            after = is_text[b] & (index > last_visual[b])
            if is_visual[b].any() and after.any():
                raters[b, after] = text_raters(seq.hidden[b, is_visual[b]], seq.hidden[b, after])
        ordinal = (is_text.cumsum(dim=1) - 1).clamp(min=0)
        table = torch.zeros(is_text.shape, dtype=torch.bool, device=is_text.device)
        table.scatter_(1, ordinal, raters & is_text)  # by ordinal among valid text tokens: stable across drops
        return table

    def _rater_queries(self, seq) -> tuple[torch.Tensor, torch.Tensor]:
        is_text = (seq.vis_index < 0) & seq.valid
        ordinal = (is_text.cumsum(dim=1) - 1).clamp(min=0, max=self._raters.shape[1] - 1)
        rater = is_text & self._raters.to(ordinal.device).gather(1, ordinal)
        count = rater.sum(dim=1)
        width = max(int(count.max()), 1)
        order = torch.argsort(rater.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
        weight = (torch.arange(width, device=count.device)[None] < count[:, None]).float()
        return order, weight / count.clamp(min=1)[:, None]

    def _relevance(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, n) rater-averaged attention at the layer before this stage, and the per-rater rows (I, Q, n)."""
        context = visual.context
        seq, lm, hidden = context["sequence"], context["lm"], context["probe"]["hidden_in"]
        query, weight = self._rater_queries(seq)
        layer = lm.layers[visual.stage - 1]
        rows = decoder_attention_rows(layer, hidden, lm.rotary_emb(hidden, seq.positions), query, seq.valid)
        b, length = seq.valid.shape
        sample = context["rows"][:, 0] // length  # each image's sample
        flat = rows.transpose(1, 2).reshape(b * length, -1)  # (B * L, Q)
        per_rater = flat[context["rows"]] * (weight[sample] > 0)[:, None]  # (I, n, Q)
        relevance = (flat[context["rows"]] * weight[sample][:, None]).sum(dim=-1)
        return relevance, per_rater.transpose(1, 2)

    def _recycle(self, features: torch.Tensor, relevance: torch.Tensor, kept: torch.Tensor):
        """Kept tokens plus the recycled cluster tokens, each at its centre's index: (indices, merged features)."""
        images, n, dim = features.shape
        deleted = torch.ones(images, n, dtype=torch.bool, device=features.device)
        deleted.scatter_(1, kept, False)
        d = n - kept.shape[1]
        deleted_index = torch.nonzero(deleted)[:, 1].view(images, d)  # in raster order
        m = int(d * 0.3) + 1
        clusters = int(m / 10) + 1
        picked = relevance.gather(1, deleted_index).topk(m, dim=1).indices  # official order: by relevance
        recycled_index = deleted_index.gather(1, picked)
        recycled = features.gather(1, recycled_index[..., None].expand(-1, -1, dim))
        centres, merged = dpc_knn_merge(recycled, clusters)
        centre_index = recycled_index.gather(1, centres)
        index = torch.cat([kept, centre_index], dim=1)
        values = torch.cat([features.gather(1, kept[..., None].expand(-1, -1, dim)), merged.to(features.dtype)], 1)
        order = index.argsort(dim=1)
        return index.gather(1, order), values.gather(1, order[..., None].expand(-1, -1, dim))

    def _select_by_rank(self, visual: VisualTokens, relevance: torch.Tensor, per_rater: torch.Tensor):
        """The 2024 release: k = min(int(rank(P) * scale + bias), n - 1) per image, no pruning where rank(P) == n."""
        n = visual.num_tokens
        rank = torch.linalg.matrix_rank(per_rater.float())  # padding rows are zero: they add no rank
        budget = torch.clamp((rank.float() * self.scale + self.bias).long(), max=n - 1)
        budget = torch.where(rank == n, torch.full_like(budget, n), budget.clamp(min=0))
        order = torch.sort(relevance, dim=1, descending=True, stable=True).indices
        position = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
        mask = position < budget[:, None]
        if not self.recycle:
            return mask
        merged = visual.features.clone()
        for count in budget.unique().tolist():  # images that keep the same count recycle together
            rows = (budget == count).nonzero().squeeze(1)
            if count >= n:
                continue
            kept = top_k_sorted(relevance[rows], count)
            index, values = self._recycle(visual.features[rows], relevance[rows], kept)
            mask[rows] = torch.zeros_like(mask[rows]).scatter_(1, index, True)
            merged[rows] = merged[rows].scatter(1, index[..., None].expand(-1, -1, values.shape[-1]), values)
        return mask, merged
