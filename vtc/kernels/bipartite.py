"""Triton: fused ToMe matching scores, i.e. row max + argmax of cos(A, B) without the score matrix.

ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) only needs, for every
A token (even index), its best cosine score against the B tokens (odd index) and which one. The
kernel streams B tiles past a resident block of A rows, keeping a running (max, argmax) per row,
so the (Na, Nb) score matrix never reaches memory. Reference:
:func:`vtc.kernels.reference.bipartite_scores`; the sort / merge that follows is shared torch code
(:func:`vtc.kernels.reference.match_from_scores`, :func:`vtc.kernels.reference.merge_wavg`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtc.kernels.cosine import block_d, block_mn, dot_tile, f32_dot, rows_contiguous
from vtc.kernels.reference import inv_norm


@triton.jit
def _rowmax_cosine_kernel(a_ptr, b_ptr, ia_ptr, ib_ptr, max_ptr, arg_ptr, NA, NB, D,
                          stride_ab, stride_an, stride_bb, stride_bn, stride_iab, stride_ibb, stride_ob,
                          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                          F32_DOT: tl.constexpr):
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    offs_a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    ia = tl.load(ia_ptr + bat * stride_iab + offs_a, mask=offs_a < NA, other=0.0)
    best = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_A,), dtype=tl.int32)
    for j0 in range(0, NB, BLOCK_B):
        offs_b = j0 + tl.arange(0, BLOCK_B)
        acc = dot_tile(a_ptr + bat * stride_ab, b_ptr + bat * stride_bb, offs_a, offs_b, NA, NB, D,
                       stride_an, stride_bn, BLOCK_A, BLOCK_B, BLOCK_D, F32_DOT)
        ib = tl.load(ib_ptr + bat * stride_ibb + offs_b, mask=offs_b < NB, other=0.0)
        sim = acc * ia[:, None] * ib[None, :]
        sim = tl.where(offs_b[None, :] < NB, sim, float("-inf"))
        tile_max, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_max > best  # strict: on ties the earlier tile (lower index) wins
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_arg + j0, best_idx)
    tl.store(max_ptr + bat * stride_ob + offs_a, best, mask=offs_a < NA)
    tl.store(arg_ptr + bat * stride_ob + offs_a, best_idx.to(tl.int64), mask=offs_a < NA)


def rowmax_cosine(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """max_j cos(a_i, b_j) and its argmax (lowest j on ties): ((B, Na) float32, (B, Na) int64)."""
    a, b = rows_contiguous(a), rows_contiguous(b)
    B, NA, D = a.shape
    NB = b.shape[1]
    node_max = torch.empty(B, NA, device=a.device, dtype=torch.float32)
    node_idx = torch.empty(B, NA, device=a.device, dtype=torch.long)
    if NA == 0 or NB == 0:
        return node_max.fill_(float("-inf")), node_idx.zero_()
    ia, ib = inv_norm(a), inv_norm(b)
    BLOCK_A = BLOCK_B = block_mn(NA, NB)
    _rowmax_cosine_kernel[(triton.cdiv(NA, BLOCK_A), B)](
        a, b, ia, ib, node_max, node_idx, NA, NB, D,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), ia.stride(0), ib.stride(0),
        node_max.stride(0),
        BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B, BLOCK_D=block_d(D), F32_DOT=f32_dot(a),
    )
    return node_max, node_idx


def bipartite_scores(metric: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`vtc.kernels.reference.bipartite_scores` (A = even, B = odd tokens).

    The strided even/odd views are read in place (no copy).
    """
    metric = rows_contiguous(metric)
    return rowmax_cosine(metric[:, 0::2], metric[:, 1::2])
