"""Downsample: average-pool each image's token grid to the budget (the spatial-pooling baseline).

Not a single paper's method: the "pooling" baseline of token-reduction papers (e.g. the 2x2 / 3x3 average
pooling of LLaVA-1.5 features compared against in VisionZip, Yang et al., CVPR 2025, and LLaVA-PruMerge,
Shang et al., 2024). No official code defines it for an arbitrary budget, so every choice is ours:

- Output grid: h' = round(sqrt(k * rows / cols)) rows of cells (roughly square cells in token units),
  clamped to [ceil(k / cols), min(rows, k)]; the k cells are split over the h' row bands as evenly as
  possible (the first k mod h' bands get one more cell). When h' divides k this is the regular h' x w'
  grid of `adaptive_avg_pool2d`; otherwise the bands differ by one cell, so exactly k tokens come out.
- Cell boundaries as in `adaptive_avg_pool2d`: band i covers rows [floor(i R / h'), ceil((i + 1) R / h'))
  and cell j of a band with w cells covers columns [floor(j C / w), ceil((j + 1) C / w)) (cells may
  overlap by one token when the sizes do not divide).
- Each cell's feature is the mean of its tokens' features (the projected features entering the LLM).
- Positions stay original: a cell's merged feature is placed at its representative token, the token
  nearest the cell centre (row round((i + 0.5) R / h' - 0.5), column round((j + 0.5) C / w - 0.5), halves
  rounded up). Consecutive centres are at least one token apart, so the k representatives are distinct and
  come out in raster order. keep=1.0 gives one cell per token: the identity.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .base import Strategy, VisualTokens, register_strategy


def band_counts(k: int, rows: int, cols: int) -> list[int]:
    """Cells per row band: h' bands (see module docstring), counts summing to k, each <= cols."""
    if not 1 <= k <= rows * cols:
        raise ValueError(f"cannot pool a {rows}x{cols} grid to {k} cells")
    h = round(math.sqrt(k * rows / cols))
    h = max(-(-k // cols), min(h, rows, k))
    base, extra = divmod(k, h)
    return [base + (i < extra) for i in range(h)]


def _spans(n_out: int, size: int) -> list[tuple[int, int, int]]:
    """(start, end, representative) of each of n_out adaptive-pooling cells over `size` tokens."""
    out = []
    for j in range(n_out):
        start, end = (j * size) // n_out, -(-((j + 1) * size) // n_out)
        rep = math.floor((j + 0.5) * size / n_out)  # round(centre), centre = (j + 0.5) size / n_out - 0.5
        out.append((start, end, rep))
    return out


@lru_cache(maxsize=64)
def pooling_plan(k: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(representatives (k,) raster indices ascending, pooling matrix (k, rows * cols), rows summing to 1)."""
    counts = band_counts(k, rows, cols)
    weights = torch.zeros(k, rows, cols)
    reps = []
    for (r0, r1, rep_r), width in zip(_spans(len(counts), rows), counts):
        for c0, c1, rep_c in _spans(width, cols):
            cell = len(reps)
            weights[cell, r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
            reps.append(rep_r * cols + rep_c)
    return torch.tensor(reps), weights.view(k, rows * cols)


@register_strategy
class Downsample(Strategy):
    name = "downsample"
    aliases = ("avgpool", "average_pool", "pooling")
    stage = "pre_llm"
    paper = "average-pooling baseline (e.g. VisionZip, CVPR 2025, Table comparisons)"
    default_keep = 0.25

    def describe(self) -> str:
        return f"downsample(keep={self.keep})"

    def select(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = visual.num_tokens, visual.budget
        rows, cols = visual.grid
        device = visual.features.device
        if k >= n or rows * cols != n:
            if k < n:
                raise ValueError(f"downsample needs the full token grid ({rows}x{cols}), got {n} tokens")
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        reps, weights = pooling_plan(k, rows, cols)
        pooled = torch.einsum("kn,ind->ikd", weights.to(device), visual.features.float())
        return reps.to(device).expand(visual.num_images, -1), pooled.to(visual.features.dtype)
