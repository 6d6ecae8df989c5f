"""Similarity ops for visual-token compression: cosine, k-center, ToMe merging, DART selection.

Every entry point dispatches to a Triton kernel (:mod:`vtc.kernels`) for CUDA tensors and to the
vectorised PyTorch reference (:mod:`vtc.kernels.reference`) otherwise. ``backend="torch"`` or
``backend="triton"`` forces one; the Triton kernels run on CPU tensors only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before the first kernel import), which is meant for tests.
Both backends use the same formulas and tie rules, so selected indices agree exactly up to
floating-point near-ties; all similarity math accumulates in float32.

Cosine similarity everywhere is ``(x_i . y_j) / (max(|x_i|, 1e-12) * max(|y_j|, 1e-12))``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vtc import kernels
from vtc.kernels import reference as ref
from vtc.kernels.reference import BipartiteMatch

__all__ = [
    "Backend",
    "BipartiteMatch",
    "TRITON_MIN_TOKENS_BIPARTITE",
    "TRITON_MIN_TOKENS_COSINE",
    "TRITON_MIN_TOKENS_DUPLICATION",
    "TRITON_MIN_TOKENS_KCENTER",
    "bipartite_match",
    "bipartite_merge",
    "duplication_select",
    "kcenter",
    "pairwise_cosine",
]

Backend = Literal["torch", "triton"]

# Dispatch thresholds for backend=None on CUDA: the Triton kernel is used when the number of tokens
# N is at least this. PROVISIONAL: they await GPU measurement with eval/bench_kernels.py (no GPU was
# available when they were written). Rationale for the guesses: below a few hundred tokens
# everything is launch-bound and cuBLAS + torch is as good; k-center's reference issues ~5 launches
# per greedy step, so its fused kernel should win early.
TRITON_MIN_TOKENS_COSINE = 1024
TRITON_MIN_TOKENS_BIPARTITE = 512
TRITON_MIN_TOKENS_KCENTER = 256
TRITON_MIN_TOKENS_DUPLICATION = 1024

_INTERPRET_HINT = (
    "set TRITON_INTERPRET=1 in the environment before the first Triton kernel import "
    "(e.g. `TRITON_INTERPRET=1 python ...`), move the tensors to CUDA, or use backend='torch'"
)


def _use_triton(backend: Backend | None, t: Tensor, n_tokens: int, min_tokens: int) -> bool:
    """Resolve ``backend`` for tensor ``t``; raise a clear error when Triton cannot run."""
    if backend is None:
        return (t.is_cuda and n_tokens >= min_tokens and kernels.triton_available()
                and not kernels.interpret_requested())
    if backend == "torch":
        return False
    if backend != "triton":
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if not kernels.triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package, which is not installed; "
                           "use backend='torch' (or backend=None to dispatch automatically)")
    if not t.is_cuda:
        if not kernels.interpret_requested():
            raise RuntimeError("backend='triton' got CPU tensors, and Triton kernels only run on CPU under "
                               f"the Triton interpreter (TRITON_INTERPRET=1, not set): {_INTERPRET_HINT}")
        if not kernels.load("cosine").interpreted():
            raise RuntimeError("backend='triton' got CPU tensors: TRITON_INTERPRET=1 is set, but vtc's "
                               "Triton kernels were already compiled for the GPU when it was not; "
                               f"{_INTERPRET_HINT}")
    return True


def _check_tokens(name: str, x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be (B, N, D), got shape {tuple(x.shape)}")


def _check_valid(valid: Tensor | None, x: Tensor) -> Tensor | None:
    if valid is None:
        return None
    if valid.shape != x.shape[:2]:
        raise ValueError(f"valid must be (B, N) = {tuple(x.shape[:2])}, got {tuple(valid.shape)}")
    return valid.to(device=x.device, dtype=torch.bool)


def pairwise_cosine(x: Tensor, y: Tensor | None = None, *, backend: Backend | None = None) -> Tensor:
    """Cosine similarities between the rows of x (B, N, D) and y (B, M, D) (default: y = x).

    Returns (B, N, M) float32. Triton: one fused tiled kernel (dot products and norm scaling).
    """
    _check_tokens("x", x)
    if y is not None:
        _check_tokens("y", y)
        if y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must share B and D")
        if y.dtype != x.dtype:
            dtype = torch.promote_types(x.dtype, y.dtype)
            x, y = x.to(dtype), y.to(dtype)
    n_tokens = max(x.shape[1], x.shape[1] if y is None else y.shape[1])
    if _use_triton(backend, x, n_tokens, TRITON_MIN_TOKENS_COSINE):
        return kernels.load("cosine").pairwise_cosine(x, y)
    return ref.pairwise_cosine(x, y)


def kcenter(x: Tensor, k: int, *, first: Tensor | int | None = None, valid: Tensor | None = None,
            backend: Backend | None = None) -> Tensor:
    """Greedy k-center / farthest point sampling with cosine distance (Gonzalez, 1985).

    The greedy 2-approximation of Gonzalez, "Clustering to minimize the maximum intercluster
    distance" (Theor. Comput. Sci. 1985), used to keep a diverse subset of visual tokens (e.g. ToDRE).
    Distance is ``1 - cos`` of the L2-normalised rows. Step 0 picks ``first``; each further step picks
    the token farthest from its nearest picked token (ties -> lowest index); picked tokens are never
    picked again.

    Args:
        x: (B, N, D) tokens, any float dtype (distances in float32).
        k: number of tokens to pick, 0 <= k <= N.
        first: (B,) int64 seed index per row, or one int for all rows (default 0). It is picked even
            when it is marked invalid. Indices are range-checked on CPU only (a check would sync CUDA).
        valid: optional (B, N) bool; False marks padding. Padded tokens are picked only after every
            valid token (lowest index first), i.e. only when k exceeds the number of valid tokens.
        backend: None (Triton on CUDA for N >= TRITON_MIN_TOKENS_KCENTER), "torch" or "triton". The
            Triton kernel runs all k steps in one launch, one program per batch row.

    Returns:
        (B, k) int64 token indices in selection order.
    """
    _check_tokens("x", x)
    B, N, _ = x.shape
    if not 0 <= k <= N:
        raise ValueError(f"k must be in [0, N={N}], got {k}")
    if first is None or isinstance(first, int):
        first = torch.full((B,), 0 if first is None else first, dtype=torch.long, device=x.device)
    if first.shape != (B,):
        raise ValueError(f"first must have shape ({B},), got {tuple(first.shape)}")
    if not first.is_cuda and ((first < 0) | (first >= N)).any():  # no host sync on CUDA
        raise ValueError(f"first indices must be in [0, {N})")
    valid = _check_valid(valid, x)
    if _use_triton(backend, x, N, TRITON_MIN_TOKENS_KCENTER):
        return kernels.load("kcenter").kcenter(x, k, first, valid)
    return ref.kcenter(x, k, first, valid)


def bipartite_match(metric: Tensor, r: int, *, protect_first: bool = False,
                    backend: Backend | None = None) -> BipartiteMatch:
    """ToMe bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

    Rows of ``metric`` are L2-normalised; A = even tokens, B = odd tokens; every A token finds its
    most cosine-similar B token (ties -> lowest index), and the r A tokens with the highest best
    score (ties -> lower A index) are merged into their match. With ``protect_first``, token 0 (the
    [CLS], an A token) never merges. ``r`` is clamped to [0, ceil(N / 2) - protect_first] (ToMe clamps
    to (N - protected) // 2, one less for odd N without protection).

    Args:
        metric: (B, N, C) matching features (e.g. attention keys), any float dtype.
        r: number of tokens to remove.
        protect_first: keep token 0 out of the merge candidates.
        backend: None (Triton on CUDA for N >= TRITON_MIN_TOKENS_BIPARTITE), "torch" or "triton". The
            Triton kernel fuses scores and row max/argmax (no (N/2, N/2) score matrix); the sort is torch.

    Returns:
        :class:`~vtc.kernels.reference.BipartiteMatch` ``(src_idx, dst_idx, keep_idx, dst_pos)``, all
        in original token indices except ``dst_pos`` (slot in ``keep_idx``): ``src_idx[:, i]`` is
        averaged into ``dst_idx[:, i]``, the output keeps the tokens ``keep_idx`` in ascending order.
        Strategies can derive positions from ``keep_idx`` (e.g. ``position_ids.gather(1, keep_idx)``).
    """
    _check_tokens("metric", metric)
    B, N, _ = metric.shape
    use_triton = _use_triton(backend, metric, N, TRITON_MIN_TOKENS_BIPARTITE)
    r = ref.clamp_r(N, r, protect_first)
    if r == 0:
        return ref.identity_match(B, N, metric.device)
    if use_triton:
        node_max, node_idx = kernels.load("bipartite").bipartite_scores(metric)
    else:
        node_max, node_idx = ref.bipartite_scores(metric)
    return ref.match_from_scores(node_max, node_idx, N, r, protect_first)


def bipartite_merge(x: Tensor, r: int, *, size: Tensor | None = None, protect_first: bool = False,
                    metric: Tensor | None = None, return_index: bool = False,
                    backend: Backend | None = None) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """ToMe token merging: bipartite soft matching + size-weighted average (``merge_wavg``).

    Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023. See :func:`bipartite_match` for
    the matching rule. Merged tokens are ``sum(size_i * x_i) / sum(size_i)`` over each group and
    sizes add up. Unlike ToMe (which outputs [unmerged A..., B...]) the surviving tokens keep their
    ORIGINAL ORDER; ``index`` gives each output token's original index.

    Args:
        x: (B, N, D) tokens (fp16 / bf16 / fp32 / fp64; averaging is done in float32).
        r: number of tokens to remove (clamped, see :func:`bipartite_match`).
        size: (B, N, 1) token sizes (how many original tokens each represents); default ones.
        protect_first: never merge token 0 (the [CLS]).
        metric: (B, N, C) matching features; default ``x``.
        return_index: also return ``index``.
        backend: see :func:`bipartite_match` (the gather / scatter merge itself is torch).

    Returns:
        ``(merged (B, N - r, D) x.dtype, size (B, N - r, 1))`` and, with ``return_index``,
        ``index (B, N - r) int64``. ``size`` keeps the dtype of the given ``size``; float32 by default.
    """
    _check_tokens("x", x)
    metric = x if metric is None else metric
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric {tuple(metric.shape)} must match x {tuple(x.shape)} in (B, N)")
    if size is not None and size.shape != (*x.shape[:2], 1):
        raise ValueError(f"size must be (B, N, 1) = {(*x.shape[:2], 1)}, got {tuple(size.shape)}")
    match = bipartite_match(metric, r, protect_first=protect_first, backend=backend)
    merged, out_size = ref.merge_wavg(x, match, size)
    if return_index:
        return merged, out_size, match.keep_idx
    return merged, out_size


def duplication_select(x: Tensor, pivots: Tensor, k: int, *, valid: Tensor | None = None,
                       backend: Backend | None = None) -> Tensor:
    """DART duplication-aware token selection (Wen et al., "Stop Looking for Important Tokens in
    Multimodal Language Models: Duplication Matters More", 2025).

    The pivots are kept, and every pivot in turn adds the not-yet-selected tokens LEAST cosine-similar
    to it, so near-duplicates of the pivots (and of each other's picks) are dropped. This follows
    the official ``get_retained_image_token`` (pivots kept; each pivot's picks are removed from the
    candidates before the next pivot), with two choices of ours so that exactly ``k`` distinct
    indices come back: the ``k - #pivots`` slots are split over the P pivots as evenly as possible
    (the first ``(k - #pivots) % P`` pivots get one more; DART gives every pivot ``budget // P``), and
    pivots are processed in the given order (DART iterates a Python set). Ties -> lowest index.

    Args:
        x: (B, N, D) tokens (DART: the normed hidden states of the layer where it prunes).
        pivots: (B, P) int64 indices into ``x``, 1 <= P <= k (DART: top-L1-norm key tokens). A pivot
            marked invalid (e.g. a text token appended to ``x`` to serve as a text pivot) acts as a
            pivot but is not returned, as DART drops its text pivots from the kept set. Indices are
            range-checked on CPU only (a check would sync CUDA).
        k: number of tokens to return, P <= k <= N.
        valid: optional (B, N) bool; only valid tokens are selected, unless k exceeds their number,
            in which case the remaining slots are filled with the lowest-index other tokens.
        backend: None (Triton on CUDA for N >= TRITON_MIN_TOKENS_DUPLICATION), "torch" or "triton".
            Triton fuses the pivot gather and the (P, N) similarities; the greedy pick is torch.

    Returns:
        (B, k) int64 selected indices, sorted ascending.
    """
    _check_tokens("x", x)
    B, N, _ = x.shape
    if pivots.dim() != 2 or pivots.shape[0] != B:
        raise ValueError(f"pivots must be (B={B}, P), got {tuple(pivots.shape)}")
    P = pivots.shape[1]
    if not 1 <= P <= k <= N:
        raise ValueError(f"need 1 <= P <= k <= N, got P={P}, k={k}, N={N}")
    pivots = pivots.to(device=x.device, dtype=torch.long)
    if not pivots.is_cuda and ((pivots < 0) | (pivots >= N)).any():  # no host sync on CUDA
        raise ValueError(f"pivot indices must be in [0, {N})")
    valid = _check_valid(valid, x)
    if _use_triton(backend, x, N, TRITON_MIN_TOKENS_DUPLICATION):
        sim = kernels.load("duplication").pivot_cosine(x, pivots)
    else:
        sim = ref.pivot_cosine(x, pivots)
    return ref.duplication_from_sim(sim, pivots, k, valid)
