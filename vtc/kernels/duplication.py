"""Triton: DART pivot similarities, cos(x[pivot_p], x_n) for all pivots p and tokens n.

DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", 2025) keeps the tokens that are least duplicated w.r.t. a few pivot tokens. The
expensive part is one pass over the N tokens against P pivots; the kernel gathers the pivot rows
through their indices (no (B, P, D) copy), tiles tokens x pivots, and writes the (B, P, N) float32
similarities. The greedy per-pivot selection on that small matrix is shared torch code
(:func:`vtc.kernels.reference.duplication_from_sim`). Reference:
:func:`vtc.kernels.reference.pivot_cosine`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtc.kernels.cosine import block_d, f32_dot, rows_contiguous
from vtc.kernels.reference import inv_norm


@triton.jit
def _pivot_cosine_kernel(x_ptr, piv_ptr, inv_ptr, out_ptr, N, P, D,
                         stride_xb, stride_xn, stride_pb, stride_ib, stride_ob, stride_op,
                         BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                         F32_DOT: tl.constexpr):
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + bat * stride_xb
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    n_ok = offs_n < N
    p_ok = offs_p < P
    piv = tl.load(piv_ptr + bat * stride_pb + offs_p, mask=p_ok, other=0)  # token index per pivot
    offs_d0 = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_ok = offs_d < D
        xt = tl.load(x_row + offs_n[:, None] * stride_xn + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        pt = tl.load(x_row + piv[:, None] * stride_xn + offs_d[None, :],
                     mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        if F32_DOT:
            acc += tl.dot(xt.to(tl.float32), tl.trans(pt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(pt))
    inv_n = tl.load(inv_ptr + bat * stride_ib + offs_n, mask=n_ok, other=0.0)
    inv_p = tl.load(inv_ptr + bat * stride_ib + piv, mask=p_ok, other=0.0)
    sim = acc * inv_p[None, :] * inv_n[:, None]
    tl.store(out_ptr + bat * stride_ob + offs_p[None, :] * stride_op + offs_n[:, None], sim,
             mask=n_ok[:, None] & p_ok[None, :])


def pivot_cosine(x: Tensor, pivots: Tensor) -> Tensor:
    """Triton version of :func:`vtc.kernels.reference.pivot_cosine`: (B, P, N) float32."""
    x = rows_contiguous(x)
    B, N, D = x.shape
    pivots = pivots.to(device=x.device, dtype=torch.long).contiguous()
    P = pivots.shape[1]
    out = torch.empty(B, P, N, device=x.device, dtype=torch.float32)
    if N == 0 or P == 0:
        return out
    inv = inv_norm(x)
    BLOCK_N = 64
    BLOCK_P = max(16, triton.next_power_of_2(P))  # tl.dot needs >= 16; P is small (DART: 8)
    _pivot_cosine_kernel[(triton.cdiv(N, BLOCK_N), B)](
        x, pivots, inv, out, N, P, D,
        x.stride(0), x.stride(1), pivots.stride(0), inv.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, BLOCK_D=block_d(D), F32_DOT=f32_dot(x),
    )
    return out
