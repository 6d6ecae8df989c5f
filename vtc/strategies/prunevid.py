"""PruneVid: static/dynamic token merging by temporal segments before the LLM, question-guided pruning in it.

Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models", ACL 2025 Findings,
arXiv:2412.16117 (github.com/Visual-AI/PruneVid: `merge_frames_dynamic`, `cluster_dpc_knn`, `refine_clusters`,
`segment_lengths` in models/pllava/modeling_pllava.py; `VTPWindowCache.process_attention` in
models/pllava/elastic_cache.py; defaults in scripts/eval.sh: tau 0.8, temporal_segment_ratio 0.25,
cluster_ratio 0.5, selected_layer 10, alpha 0.4, for the 32-layer PLLaVA-7B).

Per video (frames in temporal order), as the official code:

1. Temporal segments: the frames' mean features are clustered by DPC-KNN (`dpc_knn`, from TCFormer: distances
   cdist / sqrt(C), density exp(-mean squared distance to the k nearest), centre score = density x distance to
   the nearest denser token) into int(F x 0.25) clusters (k = 7), every frame to its nearest centre; the labels
   are refined into contiguous runs (`refine_clusters`: per cluster the longest runs stay, shorter runs and
   clusters whose runs are all single frames take the label of the neighbour run that is longer, the left one on
   ties); each run is a window.
2. Per window of W frames: a grid position is static when the mean cosine similarity of its tokens over all
   ordered frame pairs exceeds tau = 0.8 (W = 1: nothing is static). Static tokens are averaged over the window;
   the dynamic ones stay per frame. Static tokens of a window, and dynamic tokens of each frame, are clustered
   spatially by DPC-KNN (k = 7) into int(count x 0.5) clusters when there are more than 14 of them; a cluster
   becomes the mean of its members.
3. In the LLM, after decoder layer 10 (so before layer 11): each visual token's score is its attention from the
   text after the video, max over heads and over those queries, softmax over the whole causal row; every
   window keeps the int(S x alpha) best of its S static tokens and every frame the int(D x alpha) best of its D
   dynamic ones (alpha = 0.4).

`keep` is alpha (default 0.4): the fraction kept in the LLM; the pre-LLM merging has its own options (`tau`,
`segment_ratio`, `cluster_ratio`, `knn`). keep=1.0 is the identity (no merging, no pruning), so that vtc's keep=1
invariant holds; an int keep is refused (the method has no per-unit count). `layer` is the decoder layer the
pruning happens before; the default is round(11 L / 32) (11 of PLLaVA-7B's 32), at least 1. `in_llm=False`
runs stage 1 (the merging before the LLM) only.

Where we differ from the official code, and why:
- Positions: a merged static token sits at the position (M-RoPE t/h/w included) of its cluster centre in the
  window's FIRST frame, a dynamic cluster at its centre in its frame, unclustered tokens at their own grid
  position (static ones in the first frame); tokens stay in raster order frame by frame. The official sequence is
  [static tokens of window 1, dynamic tokens of its frames, static tokens of window 2, ...], renumbered.
- DPC-KNN adds uniform noise (1e-6) to the densities to break ties; we break them by index (a lower index counts
  as denser), so selections are deterministic. Top-k ties go to the lower index.
- Small inputs: k of the temporal clustering is at most F and its cluster count at least 1 (the official code
  fails on fewer than 7 frames or int(F x 0.25) = 0).
- The official pruning also cuts the KV cache of layers 0..10 to the kept tokens; here layers before the pruning
  keep their full cache (decode steps there still see every pre-LLM token), as every vtc in-LLM strategy.
- Units: LLaVA-OneVision frames; Qwen2-VL / Qwen2.5-VL / Qwen3-VL temporal patches. Images, crops and tiles are
  one-frame videos: one window, all dynamic (spatial clustering, then the in-LLM pruning).
- Queries: the valid tokens after each sample's last visual token (the official: every token after the video);
  a sample with no text after its visual tokens uses its last token.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ..local import PerThread
from ..probes import project_qk
from .base import Strategy, VisualTokens, register_strategy
from .dycoke import video_rows


# --- DPC-KNN (TCFormer's clustering, as PruneVid and HoliTom use it) ------------------------------------------
def dpc_knn(x: torch.Tensor, centers: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering centres of x (B, N, C): (centre indices (B, centers) by decreasing score,
    distances (B, N, N) = cdist / sqrt(C)). Density ties: the lower index counts as denser (no noise)."""
    b, n, c = x.shape
    dist = torch.cdist(x.float(), x.float()) / c**0.5
    nearest = dist.topk(min(knn, n), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    index = torch.arange(n, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])
    )  # [b, i, j]: j is denser than i
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    order = torch.sort(delta * density, dim=-1, descending=True, stable=True).indices[:, :centers]
    return order, dist


def nearest_center(dist: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, N) index (into `centers`) of every token's nearest centre; each centre is its own."""
    labels = dist.gather(1, centers[..., None].expand(-1, -1, dist.shape[-1])).argmin(dim=1)
    slots = torch.arange(centers.shape[1], device=dist.device).expand_as(centers)
    return labels.scatter(1, centers, slots)


def cluster_means(x: torch.Tensor, labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """(B, clusters, D) mean of the tokens of x (B, N, D) in each cluster (`compute_cluster_vectors`)."""
    sums = torch.zeros(x.shape[0], clusters, x.shape[-1], device=x.device).scatter_add(
        1, labels[..., None].expand(-1, -1, x.shape[-1]), x.float()
    )
    counts = torch.zeros(x.shape[0], clusters, device=x.device).scatter_add(1, labels, torch.ones_like(labels).float())
    return sums / counts.clamp(min=1)[..., None]


# --- temporal segments ----------------------------------------------------------------------------------------
def refine_clusters(labels: list[int]) -> list[int]:
    """PruneVid's `refine_clusters` on one video's frame labels: contiguous segments (plain loops over frames)."""
    n = len(labels)
    refined = list(labels)
    for label in sorted(set(labels)):
        runs, start = [], None
        for i in range(n + 1):
            inside = i < n and labels[i] == label
            if inside and start is None:
                start = i
            elif not inside and start is not None:
                runs.append((start, i - 1))
                start = None
        longest = max(e - s + 1 for s, e in runs)
        for s, e in runs:
            if longest == 1 or e - s + 1 != longest:
                refined[s : e + 1] = [-1] * (e - s + 1)
    i = 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < n and refined[i] == -1:
            i += 1
        end = i - 1
        left = right = None
        left_length = right_length = 0
        if start > 0:
            left = refined[start - 1]
            j = start - 1
            while j >= 0 and refined[j] == left:
                j -= 1
            left_length = start - j - 1
        if end < n - 1:
            right = refined[end + 1]
            j = end + 1
            while j < n and refined[j] == right:
                j += 1
            right_length = j - end - 1
        if left_length > right_length:
            new = left
        elif right_length > left_length:
            new = right
        else:
            new = left if left is not None else right
        refined[start : end + 1] = [0 if new is None else new] * (end - start + 1)
    return refined


def temporal_windows(frames: torch.Tensor, segment_ratio: float, knn: int) -> list[int]:
    """Window sizes (in frames, summing to F) of one video's frames (F, N, D)."""
    n_frames = frames.shape[0]
    if n_frames == 1:
        return [1]
    clusters = max(1, int(n_frames * segment_ratio))
    centers, dist = dpc_knn(frames.float().mean(dim=1)[None], clusters, min(knn, n_frames))
    labels = refine_clusters(nearest_center(dist, centers)[0].tolist())
    sizes, run = [], 1
    for a, b in zip(labels[:-1], labels[1:]):
        if a == b:
            run += 1
        else:
            sizes.append(run)
            run = 1
    return [*sizes, run]


def static_positions(window: torch.Tensor, tau: float) -> torch.Tensor:
    """(N,) bool: positions whose mean cosine similarity over all ordered frame pairs of the window (W, N, D)
    exceeds tau (the official sum over pairs minus 1 per frame, over W (W - 1)); W = 1: none."""
    w = window.shape[0]
    if w < 2:
        return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
    unit = F.normalize(window.float(), p=2, dim=-1)
    sim = torch.einsum("wlc,tlc->wtl", unit, unit)
    return ((sim.sum(dim=1) - 1).sum(dim=0) / (w * (w - 1))) > tau


def spatial_merge(x: torch.Tensor, ratio: float, knn: int, threshold: int = 14):
    """Tokens x (B, M, D) clustered into int(M ratio) means when M > threshold: (slots (B, m) sorted indices of the
    cluster centres into M, values (B, m, D)); else every token as it is."""
    b, m, _ = x.shape
    if m <= threshold:
        return torch.arange(m, device=x.device).expand(b, -1), x
    clusters = int(m * ratio)
    centers, dist = dpc_knn(x, clusters, knn)
    means = cluster_means(x, nearest_center(dist, centers), clusters)
    order = centers.sort(dim=1)
    return order.values, means.gather(1, order.indices[..., None].expand(-1, -1, x.shape[-1])).to(x.dtype)


def prunevid_video(frames: torch.Tensor, tau: float, segment_ratio: float, cluster_ratio: float, knn: int):
    """Stage 1 of PruneVid on one video's frames (F, N, D): (keep (F, N), merged (F, N, D), role (F, N): 1 static
    slot, 2 dynamic, 0 dropped)."""
    n_frames, n, _ = frames.shape
    keep = torch.zeros(n_frames, n, dtype=torch.bool, device=frames.device)
    role = torch.zeros(n_frames, n, dtype=torch.int8, device=frames.device)
    merged = frames.clone()
    start = 0
    for size in temporal_windows(frames, segment_ratio, knn):
        window = frames[start : start + size]
        static = static_positions(window, tau)
        where_static, where_dynamic = static.nonzero().squeeze(1), (~static).nonzero().squeeze(1)
        if len(where_static):
            slots, values = spatial_merge(window[:, where_static].float().mean(dim=0)[None], cluster_ratio, knn)
            at = where_static[slots[0]]
            keep[start, at], role[start, at] = True, 1
            merged[start, at] = values[0].to(merged.dtype)
        if len(where_dynamic):
            slots, values = spatial_merge(window[:, where_dynamic], cluster_ratio, knn)
            rows = torch.arange(start, start + size, device=frames.device)[:, None].expand_as(slots)
            at = where_dynamic[slots]
            keep[rows, at], role[rows, at] = True, 2
            merged[rows, at] = values.to(merged.dtype)
        start += size
    return keep, merged, role


def text_to_visual_max(visual: VisualTokens) -> torch.Tensor:
    """(I, n): each visual token's attention from the text after its sample's visual tokens at the decoder layer
    before this stage, max over heads and over those queries (softmax over the whole causal row)."""
    context = visual.context
    seq, lm, hidden = context["sequence"], context["lm"], context["probe"]["hidden_in"]
    b, length = seq.valid.shape
    position = torch.arange(length, device=hidden.device)
    last_visual = torch.where(seq.vis_index >= 0, position, -1).max(dim=1).values
    query = seq.valid & (position > last_visual[:, None])
    last = length - 1 - seq.valid.flip(1).long().argmax(dim=1)
    query[~query.any(dim=1), last[~query.any(dim=1)]] = True
    count = int(query.sum(dim=1).max())
    index = torch.argsort((~query).to(torch.int8), dim=1, stable=True)[:, :count]  # query rows first, ascending
    used = query.gather(1, index)
    layer = lm.layers[visual.stage - 1]
    q, k = project_qk(layer, hidden, lm.rotary_emb(hidden, seq.positions), index)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * layer.self_attn.scaling  # (B, H, Q, L)
    allowed = (seq.valid[:, None, :] & (position[None, None, :] <= index[..., None])) | (
        position[None, None, :] == index[..., None]
    )
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).amax(dim=1)  # (B, Q, L)
    per_key = probs.masked_fill(~used[..., None], 0.0).amax(dim=1)
    return per_key.reshape(-1)[context["rows"]]


def keep_per_role(scores: torch.Tensor, role: torch.Tensor, alpha: float) -> torch.Tensor:
    """(I, n) keep-mask: of every unit's tokens of each role (1 static, 2 dynamic), the int(count alpha) best."""
    keep = torch.zeros_like(role, dtype=torch.bool)
    for value in (1, 2):
        mine = role == value
        quota = (mine.sum(dim=1).double() * alpha + 1e-9).floor().long()
        order = torch.sort(scores.float().masked_fill(~mine, float("-inf")), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order.indices).scatter_(
            1, order.indices, torch.arange(role.shape[1], device=role.device).expand_as(role)
        )
        keep |= mine & (rank < quota[:, None])
    return keep


@register_strategy
class PruneVid(Strategy):
    name = "prunevid"
    aliases = ("prune_vid",)
    stage = "pre_llm"
    paper = "Huang et al., ACL 2025 Findings, arXiv:2412.16117"
    default_keep = 0.4
    needs_keys = True  # the in-LLM probe also carries the input of the layer before the pruning
    _layout = PerThread(None)
    _roles = PerThread({})  # unit -> (N,) role of each grid position after stage 1

    def __init__(
        self,
        keep: float | int = 0.4,
        layer: int | None = None,
        tau: float = 0.8,
        segment_ratio: float = 0.25,
        cluster_ratio: float = 0.5,
        knn: int = 7,
        in_llm: bool = True,
    ):
        super().__init__(keep)
        if isinstance(keep, numbers.Integral):
            raise ValueError(
                f"prunevid takes a fraction keep (alpha, the share of each window's static and each frame's dynamic "
                f"tokens kept in the LLM, official 0.4), not a token count: got keep={keep}"
            )
        self.layer, self.tau = layer, float(tau)
        self.segment_ratio, self.cluster_ratio, self.knn = float(segment_ratio), float(cluster_ratio), int(knn)
        self.in_llm = bool(in_llm)
        self._prune_at = -1

    @property
    def identity(self) -> bool:
        return float(self.keep) >= 1.0

    def prune_layers(self, num_layers: int) -> list[int]:
        if not self.in_llm:
            return []
        self._prune_at = self.layer if self.layer is not None else max(1, round(11 * num_layers / 32))
        return [self._prune_at]

    def describe(self) -> str:
        return (
            f"prunevid(alpha={self.keep}, layer={self.layer or '11L/32'}, tau={self.tau}, "
            f"segment_ratio={self.segment_ratio}, cluster_ratio={self.cluster_ratio})"
        )

    def select(self, visual: VisualTokens):
        n, device = visual.num_tokens, visual.features.device
        if self.identity:
            return torch.ones(visual.num_images, n, dtype=torch.bool, device=device)
        units = [int(u) for u in visual.image_index.tolist()]
        if visual.stage != "pre_llm":
            roles = torch.stack([self._roles[u].to(device) for u in units]).gather(1, visual.token_ids)
            return keep_per_role(text_to_visual_max(visual), roles, float(self.keep))
        layout = visual.context.get("layout")
        if layout is not self._layout:  # a new prefill
            self._layout, self._roles = layout, {}
        keep = torch.zeros(visual.num_images, n, dtype=torch.bool, device=device)
        merged = visual.features.clone()
        for rows in video_rows(visual):
            k, m, role = prunevid_video(
                visual.features[rows], self.tau, self.segment_ratio, self.cluster_ratio, self.knn
            )
            keep[rows], merged[rows] = k, m
            for row, r in zip(rows, role):  # by grid position, for the in-LLM stage
                full = torch.zeros(layout.counts[units[row]], dtype=torch.int8, device=device)
                self._roles[units[row]] = full.scatter(0, visual.token_ids[row], r)
        return keep, merged
