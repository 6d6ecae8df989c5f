"""HoliTom: global temporal segmentation and holistic token merging before the LLM, similarity merging in it.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", arXiv:2505.21334, 2025
(github.com/cokeshao/HoliTom: holitom/llava_arch.py `select_static_windows`, `get_static_dynamic_features`,
`holitom`, `merge_tokens_by_attention_density`, `merge_tokens_by_density`, `merge_tokens_by_clustering`,
`cluster_dpc_knn`; holitom/modeling_qwen2.py for the inner-LLM merging; defaults from the code and
scripts/eval_ov-7b_holitom.sh: RETAIN_RATIO 0.10-0.25, T = 0.8, D = 0, BETA = 0.6, K = 7, HOLITOM_k = 18 of
LLaVA-OneVision-7B's 28 decoder layers, HOLITOM_r = 0.5).

Per video (frames in temporal order; F frames of N tokens; `attn` = the attention each token receives at the
vision tower's feature layer, mean over heads and queries, pooled like the features), as the official code:

1. Global temporal segmentation: s_t = cosine similarity of frame t and t + 1 at each grid position. A window
   [s, e] saves (e - s) x #{positions similar (> tau) in every consecutive pair of the window} tokens; dynamic
   programming over the frames picks the partition into windows (of at most `max_window` frames) that saves most
   (`select_static_windows`, same recurrence, strict improvement to switch).
2. The budget is re-scaled: r = min(keep / ((F N - saved) / (F N)), 1).
3. Per window: its static positions (similar in every consecutive pair) are averaged over the window's frames;
   the remaining (dynamic) tokens of each frame keep ceil(M r) of M: round(ceil(M r)(1 - D)) by `attn` (top-k,
   "dominant"), the rest as DPC-KNN cluster centres of the others (contextual; D = 0 by default: none). Static
   tokens (windows of 2+ frames) become round(S r) DPC-KNN clusters (knn = min(K, clusters)): each centre is
   replaced by beta x itself + (1 - beta) x the mean of the other tokens assigned to it (nearest centre).
4. In the LLM, before decoder layer 18 (of 28): the last prompt token's attention at layer 17 (mean over heads)
   ranks the video's tokens; the top round(n (1 - r_llm)) stay (r_llm = 0.5) and every other token is averaged
   into its most cosine-similar kept token (hidden states entering layer 18), one after the other in sequence
   order: x <- (x + y) / 2 each time, as the official loop.

`keep` is RETAIN_RATIO (default 0.1); keep=1.0 is the identity (no merging anywhere), so that vtc's keep=1
invariant holds; an int keep is refused. `layer` (default round(18 L / 28), at least 1) and `llm_ratio` (r_llm)
set step 4; `llm_ratio=0` turns it off ("HoliTom w/o M").

Where we differ from the official code, and why:
- Positions: a static cluster sits at its centre's position in the window's FIRST frame (M-RoPE t/h/w
  included), dynamic tokens at their own; tokens stay in raster order frame by frame (the official code puts a
  window's static tokens first, then its dynamic ones, renumbered). Step 4 keeps each merged token at its place.
- DPC-KNN's 1e-6 noise on the densities is replaced by index tie-breaking (`prunevid.dpc_knn`); top-k ties go to
  the lower index.
- Step 4 runs per video (each image, crop or tile alone), with the attention of the last prompt token; the
  official code takes the one visual span of its single-video prompts.
- Units: LLaVA-OneVision frames; Qwen2-VL / Qwen2.5-VL / Qwen3-VL temporal patches. Images, crops and tiles are
  one-frame videos (one window: ceil(N keep) tokens by attention, then step 4).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ..local import PerThread
from .base import Strategy, VisualTokens, register_strategy
from .dycoke import video_rows
from .prunevid import dpc_knn
from .quota import _video_of


def static_windows(similar: torch.Tensor, max_window: int = 1024) -> tuple[list[tuple[int, int]], float]:
    """HoliTom's `select_static_windows`: similar (F - 1, N) bool (pair t, t + 1 similar at each position) ->
    (windows [(start, end)] covering the frames, tokens saved)."""
    n_frames = similar.shape[0] + 1
    saved = torch.zeros(n_frames, n_frames, dtype=torch.float64)
    for start in range(n_frames - 1):  # [start, end]: positions similar in every pair of the window
        run = torch.cumprod(similar[start:].long(), dim=0).sum(dim=1).double().cpu()
        ends = torch.arange(start + 1, n_frames)
        saved[start, ends] = run * (ends - start).double()
    best = [0.0] * n_frames
    first = [0] * n_frames
    for i in range(n_frames):
        value, start = (best[i - 1] if i > 0 else 0.0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            candidate = (best[j] if j >= 0 else 0.0) + float(saved[j + 1, i])
            if candidate > value:
                value, start = candidate, j + 1
        best[i], first[i] = value, start
    windows, i = [], n_frames - 1
    while i >= 0:
        windows.append((first[i], i))
        i = first[i] - 1
    return windows[::-1], best[-1]


def merge_into_centers(x: torch.Tensor, centers: torch.Tensor, dist: torch.Tensor, beta: float) -> torch.Tensor:
    """`merge_tokens_by_clustering`: (B, c, D) centre tokens, each beta x itself + (1 - beta) x the mean of the
    non-centre tokens nearest to it (itself alone when none is)."""
    b, n, d = x.shape
    c = centers.shape[1]
    is_center = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter(1, centers, True)
    label = dist.gather(2, centers[:, None, :].expand(-1, n, -1)).argmin(dim=2)  # (B, N) nearest centre
    weight = (~is_center).float()
    sums = torch.zeros(b, c, d, device=x.device)
    sums.scatter_add_(1, label[..., None].expand(-1, -1, d), x.float() * weight[..., None])
    counts = torch.zeros(b, c, device=x.device).scatter_add(1, label, weight)
    own = x.float().gather(1, centers[..., None].expand(-1, -1, d))
    mixed = beta * own + (1 - beta) * sums / counts.clamp(min=1)[..., None]
    return torch.where(counts[..., None] > 0, mixed, own)


def density_merge(x: torch.Tensor, count: int, knn: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_tokens_by_density` on x (B, S, D) to `count` tokens: (sorted centre indices (B, count), values)."""
    if count <= 0:
        return torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device), x[:, :0]
    centers, dist = dpc_knn(x, count, min(knn, count))
    centers = centers.sort(dim=1).values
    return centers, merge_into_centers(x, centers, dist, beta).to(x.dtype)


def attention_density_merge(x, attn, ratio: float, dominant_share: float, knn: int, beta: float):
    """`merge_tokens_by_attention_density` on the dynamic tokens x (W, M, D) of a window: ceil(M ratio) per frame,
    round(ceil(M ratio)(1 - D)) by attention, the rest as clusters of the others. Returns (W, M) keep and values."""
    w, m, d = x.shape
    total = math.ceil(m * ratio)
    dominant = round(total * (1 - dominant_share))
    keep = torch.zeros(w, m, dtype=torch.bool, device=x.device)
    values = x.clone()
    if dominant > 0:
        top = torch.sort(attn.float(), dim=1, descending=True, stable=True).indices[:, :dominant]
        keep.scatter_(1, top, True)
    contextual = total - dominant
    if contextual > 0:
        rest = (~keep).nonzero()[:, 1].view(w, m - dominant)  # ascending within each frame
        feats = x.gather(1, rest[..., None].expand(-1, -1, d))
        centers, merged = density_merge(feats, contextual, knn, beta)
        at = rest.gather(1, centers)
        keep.scatter_(1, at, True)
        values.scatter_(1, at[..., None].expand(-1, -1, d), merged)
    return keep, values


def holitom_video(frames, attn, ratio: float, tau: float, dominant_share: float, beta: float, knn: int, max_window):
    """Steps 1-3 on one video's frames (F, N, D) with their attention (F, N): keep (F, N), values (F, N, D)."""
    n_frames, n, d = frames.shape
    unit = F.normalize(frames.float(), p=2, dim=-1)
    similar = F.cosine_similarity(unit[:-1], unit[1:], dim=-1) > tau  # (F - 1, N)
    windows, saved = static_windows(similar, max_window)
    total = n_frames * n
    ratio = min(ratio / ((total - saved) / total), 1.0)
    keep = torch.zeros(n_frames, n, dtype=torch.bool, device=frames.device)
    values = frames.clone()
    for start, end in windows:
        static = similar[start:end].all(dim=0) if end > start else torch.zeros(n, dtype=torch.bool, device=keep.device)
        dynamic = (~static).nonzero().squeeze(1)
        rows = torch.arange(start, end + 1, device=frames.device)
        k, v = attention_density_merge(
            frames[rows][:, dynamic], attn[rows][:, dynamic], ratio, dominant_share, knn, beta
        )
        keep[rows[:, None], dynamic[None]] = k
        values[rows[:, None], dynamic[None]] = v
        if end > start and bool(static.any()):
            where = static.nonzero().squeeze(1)
            mean = frames[rows][:, where].float().mean(dim=0)[None]
            centers, merged = density_merge(mean, round(len(where) * ratio), knn, beta)
            at = where[centers[0]]
            keep[start, at] = True
            values[start, at] = merged[0].to(values.dtype)
    return keep, values


def sequential_pair_merge(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Step 4's merging on one video's tokens x (T, D) (sequence order) with `kept` (T,) bool: every dropped token,
    in order, is averaged into its most cosine-similar kept token (x <- (x + y) / 2). Closed form of the loop: a kept
    token merged with y_1..y_c becomes x / 2^c + sum_j y_j / 2^(c - j + 1)."""
    keep_idx, drop_idx = kept.nonzero().squeeze(1), (~kept).nonzero().squeeze(1)
    if len(drop_idx) == 0 or len(keep_idx) == 0:
        return x
    sim = F.normalize(x[drop_idx].float(), dim=-1) @ F.normalize(x[keep_idx].float(), dim=-1).T  # cosine
    target = sim.argmax(dim=1)  # (drops,) into keep_idx, first on ties
    count = torch.zeros(len(keep_idx), device=x.device).scatter_add(0, target, torch.ones_like(target).float())
    one_hot = F.one_hot(target, len(keep_idx)).float()
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1)  # 1-based order among the drops into the same target
    weight = torch.pow(0.5, count[target] - rank + 1)
    out = x.float().clone()
    out[keep_idx] = out[keep_idx] * torch.pow(0.5, count)[:, None]
    out.index_add_(0, keep_idx[target], x[drop_idx].float() * weight[:, None])
    return out.to(x.dtype)


@register_strategy
class HoliTom(Strategy):
    name = "holitom"
    aliases = ("holi_tom",)
    stage = "pre_llm"
    paper = "Shao et al., arXiv:2505.21334, 2025"
    default_keep = 0.1
    text_queries = "last"
    _step4 = PerThread(None)  # (layout, stage, result) of this thread's last in-LLM merge

    def __init__(
        self,
        keep: float | int = 0.1,
        layer: int | None = None,
        llm_ratio: float = 0.5,
        tau: float = 0.8,
        dominant: float = 0.0,
        beta: float = 0.6,
        knn: int = 7,
        max_window: int = 1024,
    ):
        super().__init__(keep)
        if isinstance(keep, numbers.Integral):
            raise ValueError(
                f"holitom takes a fraction keep (RETAIN_RATIO, the share of a video's tokens kept before the LLM, "
                f"official 0.10-0.25), not a token count: got keep={keep}"
            )
        if not 0.0 <= float(llm_ratio) < 1.0:
            raise ValueError(f"llm_ratio={llm_ratio}: the share merged away inside the LLM, in [0, 1) (official 0.5)")
        self.layer, self.llm_ratio, self.tau = layer, float(llm_ratio), float(tau)
        self.dominant, self.beta, self.knn, self.max_window = float(dominant), float(beta), int(knn), int(max_window)

    @property
    def identity(self) -> bool:
        return float(self.keep) >= 1.0

    def prune_layers(self, num_layers: int) -> list[int]:
        if self.llm_ratio == 0:
            return []
        return [self.layer if self.layer is not None else max(1, round(18 * num_layers / 28))]

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"received": [feature_layer]}

    def describe(self) -> str:
        return (
            f"holitom(keep={self.keep}, tau={self.tau}, beta={self.beta}, D={self.dominant}, "
            f"llm_ratio={self.llm_ratio}, layer={self.layer or '18L/28'})"
        )

    def select(self, visual: VisualTokens):
        n, device = visual.num_tokens, visual.features.device
        if self.identity:
            return torch.ones(visual.num_images, n, dtype=torch.bool, device=device)
        if visual.stage != "pre_llm":
            keep_row, values_row = self._llm_merge(visual)
            rows = visual.context["rows"]
            return keep_row[rows], values_row[rows]
        keep = torch.zeros(visual.num_images, n, dtype=torch.bool, device=device)
        values = visual.features.clone()
        (attention,) = visual.received_attention.values()
        attention = attention.mean(dim=1)
        for rows in video_rows(visual):
            k, v = holitom_video(
                visual.features[rows],
                attention[rows],
                float(self.keep),
                self.tau,
                self.dominant,
                self.beta,
                self.knn,
                self.max_window,
            )
            keep[rows], values[rows] = k, v
        return keep, values

    def _llm_merge(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4 for every video of the batch at once (its frames may be in other unit groups of this stage, which
        keep different counts after step 3): keep and merged values per row of the flattened sequence."""
        context = visual.context
        layout, seq = context["layout"], context["sequence"]
        if self._step4 is not None and self._step4[0] is layout and self._step4[1] == visual.stage:
            return self._step4[2]
        b, length, d = seq.hidden.shape
        device = seq.hidden.device
        unit_of = torch.zeros(sum(layout.counts), dtype=torch.long, device=device)
        video_of: dict[tuple, int] = {}
        video_id = []
        for unit in range(len(layout.counts)):
            unit_of[layout.unit_tokens(unit, device)] = unit
            video_id.append(video_of.setdefault(_video_of(layout, unit), len(video_of)))
        present = (seq.vis_index >= 0).reshape(-1)
        rows = present.nonzero().squeeze(1)  # sequence order, sample by sample
        flat = seq.vis_index.reshape(-1)[rows]
        video = torch.tensor(video_id, device=device)[unit_of[flat]]
        scores = context["probe"]["text_attention"][flat]
        hidden = seq.hidden.reshape(-1, d)
        keep_row = torch.zeros(b * length, dtype=torch.bool, device=device)
        values_row = hidden.clone()
        for v in video.unique().tolist():
            mine = rows[video == v]
            s = scores[video == v]
            kept = torch.zeros(len(mine), dtype=torch.bool, device=device)
            top = torch.sort(s.float(), descending=True, stable=True).indices
            kept[top[: round(len(mine) * (1 - self.llm_ratio))]] = True
            keep_row[mine] = kept
            values_row[mine] = sequential_pair_merge(hidden[mine], kept)
        self._step4 = (layout, visual.stage, (keep_row, values_row))
        return keep_row, values_row
