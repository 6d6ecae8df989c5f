"""Triton: fused greedy k-center (farthest point sampling) with cosine distance.

Greedy 2-approximation of Gonzalez (1985), "Clustering to minimize the maximum intercluster
distance", as used for diverse visual-token selection (e.g. ToDRE). One program per batch row
runs all k steps: per step it streams the N tokens once, computes the distance to the newest
center, folds it into the running min-distance and reduces the argmax in the same pass, so no
(N, N) distance matrix and no per-step kernel launch / host sync is needed.

Two variants, same result:

- ``_kcenter_onchip_kernel`` (N <= ONCHIP_MAX_N): the whole running min-distance row is a register
  tensor carried across the k steps, never written to memory.
- ``_kcenter_kernel`` (larger N, up to ~10k tokens, which do not fit one program's registers): the
  min-distance row lives in a (B, N) float32 scratch buffer, streamed in BLOCK_N chunks together
  with the tokens; it is L1/L2 resident and < 1 % of the token traffic (4 vs 2 * D bytes per token).

Reference: :func:`vtc.kernels.reference.kcenter` (same formula, same tie rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtc.kernels.cosine import rows_contiguous
from vtc.kernels.reference import inv_norm, kcenter_init

ONCHIP_MAX_N = 1024
"""Largest N handled by the register-resident kernel (awaits GPU tuning, see eval/bench_kernels.py)."""


@triton.jit
def _kcenter_onchip_kernel(x_ptr, inv_ptr, first_ptr, mind_ptr, out_ptr, N, D, K,
                           stride_xb, stride_xn, stride_ib, stride_mb, stride_ob,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bat = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + bat * stride_xb
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    inv = tl.load(inv_ptr + bat * stride_ib + offs_n, mask=n_ok, other=0.0)
    # initial state (+inf valid, -1 padding); out-of-range lanes -inf so they never win
    mind = tl.load(mind_ptr + bat * stride_mb + offs_n, mask=n_ok, other=float("-inf"))
    c = tl.load(first_ptr + bat)  # int64 index of the newest center
    tl.store(out_ptr + bat * stride_ob, c)
    for step in range(1, K):
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            d_ok = offs_d < D
            center = tl.load(x_row + c * stride_xn + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            xt = tl.load(x_row + offs_n[:, None] * stride_xn + offs_d[None, :],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xt * center[None, :], axis=1)
        inv_c = tl.load(inv_ptr + bat * stride_ib + c)
        mind = tl.minimum(mind, 1.0 - acc * inv * inv_c)
        mind = tl.where((offs_n == c) | (offs_n >= N), float("-inf"), mind)
        c = tl.argmax(mind, axis=0, tie_break_left=True).to(tl.int64)
        tl.store(out_ptr + bat * stride_ob + step, c)


@triton.jit
def _kcenter_kernel(x_ptr, inv_ptr, first_ptr, mind_ptr, out_ptr, N, D, K,
                    stride_xb, stride_xn, stride_ib, stride_mb, stride_ob,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bat = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + bat * stride_xb
    inv_row = inv_ptr + bat * stride_ib
    mind_row = mind_ptr + bat * stride_mb
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D)
    c = tl.load(first_ptr + bat)  # int64 index of the newest center
    tl.store(out_ptr + bat * stride_ob, c)
    for step in range(1, K):
        inv_c = tl.load(inv_row + c)
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = c
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + offs_n0
            n_ok = offs_n < N
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                d_ok = offs_d < D
                center = tl.load(x_row + c * stride_xn + offs_d, mask=d_ok, other=0.0).to(tl.float32)
                xt = tl.load(x_row + offs_n[:, None] * stride_xn + offs_d[None, :],
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(xt * center[None, :], axis=1)
            inv = tl.load(inv_row + offs_n, mask=n_ok, other=0.0)
            dist = 1.0 - acc * inv * inv_c
            mind = tl.load(mind_row + offs_n, mask=n_ok, other=float("-inf"))
            mind = tl.minimum(mind, dist)
            mind = tl.where(offs_n == c, float("-inf"), mind)
            mind = tl.where(n_ok, mind, float("-inf"))
            tl.store(mind_row + offs_n, mind, mask=n_ok)
            tile_max, tile_arg = tl.max(mind, axis=0, return_indices=True, return_indices_tie_break_left=True)
            better = tile_max > best  # strict: on ties the earlier tile (lower index) wins
            best_idx = tl.where(better, (n0 + tile_arg).to(tl.int64), best_idx)
            best = tl.where(better, tile_max, best)
        c = best_idx
        tl.store(out_ptr + bat * stride_ob + step, c)
        tl.debug_barrier()  # the next step re-reads the scratch row written above


def kcenter(x: Tensor, k: int, first: Tensor, valid: Tensor | None = None,
            onchip_max_n: int = ONCHIP_MAX_N) -> Tensor:
    """Triton version of :func:`vtc.kernels.reference.kcenter`: (B, k) int64 in pick order.

    Uses the register-resident kernel when N <= ``onchip_max_n``, else the chunked one.
    """
    x = rows_contiguous(x)
    B, N, D = x.shape
    out = torch.empty(B, k, dtype=torch.long, device=x.device)
    if k == 0:
        return out
    inv = inv_norm(x)
    mind = kcenter_init(valid, (B, N), x.device)
    first = first.to(device=x.device, dtype=torch.long).contiguous()
    args = (x, inv, first, mind, out, N, D, k,
            x.stride(0), x.stride(1), inv.stride(0), mind.stride(0), out.stride(0))
    if N <= onchip_max_n:
        BLOCK_N = triton.next_power_of_2(N)
        BLOCK_D = max(16, min(64, triton.next_power_of_2(D), 16384 // BLOCK_N))  # <= 16k-element tile
        _kcenter_onchip_kernel[(B,)](*args, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                     num_warps=8 if BLOCK_N >= 512 else 4)
    else:
        BLOCK_N = min(256, triton.next_power_of_2(N))
        BLOCK_D = max(16, min(64, triton.next_power_of_2(D)))
        _kcenter_kernel[(B,)](*args, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out
