"""Triton: fused pairwise cosine similarity (dot products + norm scaling in one pass).

Reference: :func:`vtc.kernels.reference.pairwise_cosine`. Both compute
``(x_i . y_j) * inv|x_i| * inv|y_j|`` with float32 accumulation; the inverse norms (B, N) are
computed once by torch (one read of the inputs), the kernel never materialises a normalised copy.

Importing this module imports triton; ``vtc.ops`` only imports it when the triton backend is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtc.kernels.reference import inv_norm


@triton.jit
def dot_tile(x_ptr, y_ptr, offs_m, offs_n, M, N, D, stride_xm, stride_ym,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 tile of x[offs_m] . y[offs_n]^T, looping over D in BLOCK_D chunks.

    Rows are ``ptr + row * stride``; the feature dim must be contiguous. Out-of-range rows read 0.
    """
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + d[None, :],
                     mask=(offs_m[:, None] < M) & (d[None, :] < D), other=0.0)
        yt = tl.load(y_ptr + offs_n[:, None] * stride_ym + d[None, :],
                     mask=(offs_n[:, None] < N) & (d[None, :] < D), other=0.0)
        if F32_DOT:  # exact fp32 products (TF32 would break index parity with torch)
            acc += tl.dot(xt.to(tl.float32), tl.trans(yt.to(tl.float32)), input_precision="ieee")
        else:  # fp16 / bf16 inputs: tensor cores, fp32 accumulation
            acc += tl.dot(xt, tl.trans(yt))
    return acc


@triton.jit
def _pairwise_cosine_kernel(x_ptr, y_ptr, ix_ptr, iy_ptr, out_ptr, M, N, D,
                            stride_xb, stride_xm, stride_yb, stride_ym, stride_ixb, stride_iyb,
                            stride_ob, stride_om,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            F32_DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot_tile(x_ptr + b * stride_xb, y_ptr + b * stride_yb, offs_m, offs_n, M, N, D,
                   stride_xm, stride_ym, BLOCK_M, BLOCK_N, BLOCK_D, F32_DOT)
    ix = tl.load(ix_ptr + b * stride_ixb + offs_m, mask=offs_m < M, other=0.0)
    iy = tl.load(iy_ptr + b * stride_iyb + offs_n, mask=offs_n < N, other=0.0)
    sim = acc * ix[:, None] * iy[None, :]
    tl.store(out_ptr + b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :], sim,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def block_mn(rows: int, cols: int) -> int:
    """Square output tile: 64 x 64 once both sides are large enough, else 32 x 32. Awaits GPU tuning."""
    return 64 if min(rows, cols) >= 64 else 32


def block_d(D: int) -> int:
    """Feature chunk: 16..64 (tl.dot needs >= 16)."""
    return max(16, min(64, triton.next_power_of_2(D)))


def interpreted() -> bool:
    """True when this module's kernels were built by the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return type(_pairwise_cosine_kernel).__name__ == "InterpretedFunction"


def f32_dot(x: Tensor) -> bool:
    """Whether tiles are multiplied in fp32: always for float32 and float64 inputs (float64 tiles are
    rounded to float32, as the reference does), and for bfloat16 under the interpreter, whose bf16
    ``tl.dot`` is wrong (triton 3.9: it multiplies the raw bit patterns)."""
    return x.dtype in (torch.float32, torch.float64) or (x.dtype == torch.bfloat16 and interpreted())


def rows_contiguous(x: Tensor) -> Tensor:
    """The kernels need a unit stride on the feature dim only (strided token views are fine)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def pairwise_cosine(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Triton version of :func:`vtc.kernels.reference.pairwise_cosine`: (B, N, M) float32."""
    y = x if y is None else y
    x, y = rows_contiguous(x), rows_contiguous(y)
    B, M, D = x.shape
    N = y.shape[1]
    out = torch.empty(B, M, N, device=x.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return out
    ix, iy = inv_norm(x), inv_norm(y)
    BLOCK_M = BLOCK_N = block_mn(M, N)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), B)
    _pairwise_cosine_kernel[grid](
        x, y, ix, iy, out, M, N, D,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), ix.stride(0), iy.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(D), F32_DOT=f32_dot(x),
    )
    return out
