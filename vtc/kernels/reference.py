"""PyTorch reference implementations of the similarity ops (what runs on CPU).

Every function here is vectorised over batch and tokens (k-center loops over its k greedy steps,
duplication selection over its P pivots, never over tokens) and accumulates in float32 whatever
the input dtype. The Triton kernels in this package compute the same quantities with the same
formulas, so their outputs can be compared index for index:

    cos(x_i, y_j) = (x_i . y_j) * inv|x_i| * inv|y_j|,   inv|v| = 1 / max(||v||_2, EPS)

The selection / merging rules that are shared by both backends (sorting of ToMe scores, the
size-weighted merge, DART's per-pivot greedy pick) live here too and take precomputed
similarities, so the Triton path only replaces the O(N^2 D) / O(k N D) similarity work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

EPS = 1e-12
"""Norm floor, as in ``torch.nn.functional.normalize``: an all-zero row has cosine 0 to everything."""


class BipartiteMatch(NamedTuple):
    """Result of ToMe bipartite soft matching, all indices in the ORIGINAL token numbering.

    Attributes:
        src_idx: (B, r) tokens that are merged away (even = "A" tokens), highest match score first.
        dst_idx: (B, r) token each ``src_idx`` merges into (odd = "B" tokens); several sources may
            share one destination.
        keep_idx: (B, N - r) surviving tokens (unmerged A tokens and all B tokens) in ascending
            original order; output token ``j`` of :func:`merge_wavg` represents ``keep_idx[:, j]``.
        dst_pos: (B, r) position of ``dst_idx`` inside ``keep_idx``, i.e. the output slot each source
            is averaged into (``keep_idx.gather(1, dst_pos) == dst_idx``).
    """

    src_idx: Tensor
    dst_idx: Tensor
    keep_idx: Tensor
    dst_pos: Tensor


# --------------------------------------------------------------------------------------- cosine
def inv_norm(x: Tensor) -> Tensor:
    """1 / max(||x||_2, EPS) over the last dim, in float32 (no float32 copy of ``x`` is made).

    float64 input: the norm is taken in float64 and rounded to float32 (vector_norm does not narrow)."""
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=-1, dtype=accumulate).float().clamp_min(EPS).reciprocal()


def pairwise_cosine(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine similarities (B, N, M) float32 between the rows of x (B, N, D) and y (B, M, D)."""
    y = x if y is None else y
    dots = torch.bmm(x.float(), y.float().transpose(1, 2))
    return dots * inv_norm(x)[:, :, None] * inv_norm(y)[:, None, :]


# ------------------------------------------------------------------------------------- k-center
def kcenter_init(valid: Tensor | None, shape: tuple[int, int], device: torch.device) -> Tensor:
    """Initial running min-distance (B, N) float32: +inf for valid tokens, -1 for padded ones.

    Cosine distances lie in [0, 2], so a padded token (-1) is only ever picked once every valid
    token has been picked; picked tokens are set to -inf and are never picked again.
    """
    inf = torch.full(shape, float("inf"), device=device)
    if valid is None:
        return inf
    return torch.where(valid.to(device=device, dtype=torch.bool), inf, torch.full_like(inf, -1.0))


def kcenter(x: Tensor, k: int, first: Tensor, valid: Tensor | None = None) -> Tensor:
    """Greedy k-center (farthest point sampling) with cosine distance; (B, k) int64 in pick order.

    Step 0 picks ``first``; every further step picks the token whose distance to its nearest
    picked token is largest (ties -> lowest index) and folds its distances into the running min.
    One (B, N, D) mat-vec per step, O(k N D) in total.
    """
    B, N, _ = x.shape
    out = torch.empty(B, k, dtype=torch.long, device=x.device)
    if k == 0:
        return out
    xf = x.float()
    inv = inv_norm(x)
    rows = torch.arange(B, device=x.device)
    mind = kcenter_init(valid, (B, N), x.device)
    c = first.to(device=x.device, dtype=torch.long)
    out[:, 0] = c
    xt = xf.transpose(1, 2)  # (1, D) @ (D, N) per row: much faster than (N, D) @ (D, 1) in CPU bmm
    for step in range(1, k):
        center = xf[rows, c]  # (B, D)
        dots = torch.bmm(center[:, None, :], xt)[:, 0]
        dist = 1.0 - dots * inv * inv[rows, c][:, None]
        mind = torch.minimum(mind, dist)
        mind[rows, c] = float("-inf")
        c = mind.argmax(dim=1)  # first maximal index on ties
        out[:, step] = c
    return out


# ---------------------------------------------------------------------------------- bipartite
def clamp_r(n_tokens: int, r: int, protect_first: bool) -> int:
    """r clamped to [0, #A tokens - protect_first], #A = ceil(N / 2).

    Note: ToMe clamps to (N - protected) // 2, which is one less for odd N without protection; we
    allow merging every A token.
    """
    n_a = (n_tokens + 1) // 2
    return max(0, min(int(r), n_a - int(protect_first)))


def bipartite_scores(metric: Tensor) -> tuple[Tensor, Tensor]:
    """For every A token (even index), its best cosine score against B (odd) and the B-local argmax.

    Returns (node_max (B, Na) float32, node_idx (B, Na) int64); ties -> lowest B index.
    """
    a, b = metric[:, 0::2], metric[:, 1::2]
    return pairwise_cosine(a, b).max(dim=-1)


def match_from_scores(node_max: Tensor, node_idx: Tensor, n_tokens: int, r: int,
                      protect_first: bool) -> BipartiteMatch:
    """Turn per-A-token best matches into a :class:`BipartiteMatch` (shared by both backends).

    The r A tokens with the highest best-score are merged (ties -> lower A index, stable sort);
    ``protect_first`` removes A[0] (the [CLS]) from the candidates. ``r`` must already be clamped.
    """
    B = node_max.shape[0]
    device = node_max.device
    if protect_first:
        node_max = node_max.clone()
        node_max[:, 0] = float("-inf")
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[:, :r]
    src_idx = 2 * order
    dst_idx = 2 * node_idx.gather(1, order) + 1
    keep = torch.ones(B, n_tokens, dtype=torch.bool, device=device)
    keep.scatter_(1, src_idx, False)
    keep_idx = torch.arange(n_tokens, device=device).expand(B, n_tokens)[keep].view(B, n_tokens - r)
    dst_pos = (keep.cumsum(dim=1) - 1).gather(1, dst_idx)
    return BipartiteMatch(src_idx, dst_idx, keep_idx, dst_pos)


def bipartite_match(metric: Tensor, r: int, protect_first: bool = False) -> BipartiteMatch:
    """ToMe bipartite soft matching (reference). ``r`` is clamped with :func:`clamp_r`."""
    n = metric.shape[1]
    r = clamp_r(n, r, protect_first)
    if r == 0:
        return identity_match(metric.shape[0], n, metric.device)
    node_max, node_idx = bipartite_scores(metric)
    return match_from_scores(node_max, node_idx, n, r, protect_first)


def identity_match(B: int, n: int, device: torch.device) -> BipartiteMatch:
    """The r = 0 match: nothing merged, every token kept."""
    empty = torch.empty(B, 0, dtype=torch.long, device=device)
    keep = torch.arange(n, device=device).expand(B, n).contiguous()
    return BipartiteMatch(empty, empty, keep, empty)


def merge_wavg(x: Tensor, match: BipartiteMatch, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge (ToMe ``merge_wavg``) keeping the original token order.

    out_j = sum_{i in group j} size_i x_i / sum size_i over the tokens merged into kept token j.
    Accumulates in float32; returns (merged (B, N - r, D) in x.dtype, size (B, N - r, 1) in
    size.dtype, float32 when ``size`` is None).
    """
    B, N, D = x.shape
    size_dtype = torch.float32 if size is None else size.dtype
    sz = torch.ones(B, N, 1, device=x.device) if size is None else size.float()
    w = x.float() * sz
    keep_d = match.keep_idx[:, :, None].expand(-1, -1, D)
    out = w.gather(1, keep_d)
    out_sz = sz.gather(1, match.keep_idx[:, :, None])
    if match.src_idx.shape[1] > 0:
        src_d = match.src_idx[:, :, None].expand(-1, -1, D)
        out.scatter_add_(1, match.dst_pos[:, :, None].expand(-1, -1, D), w.gather(1, src_d))
        out_sz.scatter_add_(1, match.dst_pos[:, :, None], sz.gather(1, match.src_idx[:, :, None]))
    return (out / out_sz).to(x.dtype), out_sz.to(size_dtype)


# -------------------------------------------------------------------------------- duplication
def pivot_cosine(x: Tensor, pivots: Tensor) -> Tensor:
    """Cosine similarity (B, P, N) float32 of each pivot token ``x[b, pivots[b, p]]`` to every token."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return pairwise_cosine(x[rows, pivots], x)


def duplication_from_sim(sim: Tensor, pivots: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """DART duplication-aware selection from pivot similarities ``sim`` (B, P, N); (B, k) sorted.

    Rule (see ``vtc.ops.duplication_select`` for the mapping to the official code):

    1. the distinct valid pivots are selected first (invalid pivots act as pivots only);
    2. the remaining ``k - #pivots`` slots are split over the P pivots as evenly as possible
       (the first ``rem % P`` pivots get one more);
    3. pivots are processed in the given order; pivot p takes its quota of not-yet-selected valid
       tokens with the LOWEST cosine similarity to it (ties -> lowest index), so tokens picked by
       an earlier pivot are never picked twice;
    4. if valid tokens run out, the remaining slots are filled with the lowest-index unselected
       padded tokens (only when k > #valid tokens).
    """
    B, P, N = sim.shape
    device = sim.device
    rows = torch.arange(B, device=device)[:, None]
    is_valid = (torch.ones(B, N, dtype=torch.bool, device=device) if valid is None
                else valid.to(device=device, dtype=torch.bool))
    selected = torch.zeros(B, N, dtype=torch.bool, device=device)
    selected[rows, pivots] = is_valid.gather(1, pivots)
    n_sel = selected.sum(dim=1)
    remaining = (k - n_sel).clamp_min(0)
    pos = torch.arange(N, device=device)
    # invalid tokens rank after every valid token (cos <= 1 < 2); selected ones never come up.
    base = torch.where(is_valid[:, None], sim, torch.full_like(sim, 2.0))
    for p in range(P):
        quota = remaining // P + (p < remaining % P).long()  # (B,)
        key = base[:, p].masked_fill(selected, float("inf"))
        order = torch.sort(key, dim=1, stable=True).indices
        take = pos[None, :] < quota[:, None]
        selected[rows.expand(B, N)[take], order[take]] = True
    return pos.expand(B, N)[selected].view(B, -1)[:, :k]


def duplication_select(x: Tensor, pivots: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """DART duplication-aware selection (reference); see :func:`duplication_from_sim`."""
    return duplication_from_sim(pivot_cosine(x, pivots), pivots, k, valid)
