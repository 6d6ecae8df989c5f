"""DyCoke: token temporal merging (TTM) of video frames before the LLM.

Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", CVPR 2025,
arXiv:2411.15024 (github.com/KD-TAO/DyCoke: `dycole_ttm` in llava/model/llava_arch.py, called on
LLaVA-OneVision's pooled video features; the decode-time part in llava/model/language_model/modeling_qwen2.py).

TTM as in the official `dycole_ttm`, per video (frames in temporal order, tokens of a frame at the same grid
position compared with each other by cosine similarity):

1. Pairs (i, i + 1), i = 0, 2, 4, ...: frame i + 1 keeps the int((1 - K) N) tokens LEAST similar to the token
   at the same position of frame i (N tokens per frame); frame i is kept whole.
2. Windows of four, i in range(0, F - 4, 4): frame i + 2 keeps the int((1 - K) N) tokens least similar to the
   same position of frame i (the whole, unpruned frame i + 2 against the whole frame i).
   The official loop bound `range(0, F - 4, 4)` leaves the last window of four out (a 32-frame video prunes
   frames 2, 6, ..., 26 in this step, not 30; a 4-frame video none): kept as is.
The official dycoke_k (K) defaults to 0.7 (lmms_eval/models/llava_onevision.py, README), i.e. 30% of a pruned
frame's tokens stay: here `keep` = 1 - K (default 0.3) is the fraction each PRUNED frame keeps (an int keep: that
many tokens); the first frame of every pair stays whole, so a video keeps more than `keep` overall (about
(1 + 0.3 x 3) / 4 = 48% at the default). Nothing is merged: the "merging" of the paper drops the redundant tokens.

Where we differ from the official code, and why:
- Kept tokens keep their raster order and original positions (M-RoPE t/h/w included); the official code
  appends a frame's kept tokens in order of increasing similarity and renumbers the shortened sequence.
- Ties go to the lower index (the official `topk(largest=False)` leaves them unspecified).
- An odd frame count keeps its last, unpaired frame whole (the official pair loop drops it from the sequence).
- Units: a LLaVA-OneVision video frame; a Qwen2-VL / Qwen2.5-VL / Qwen3-VL temporal patch (two frames merged by
  the vision tower). Images, crops and InternVL tiles are single frames: TTM has no pair to compare, they stay
  whole (as the official code, which runs TTM on videos only); the report says so.
- The decode-time dynamic KV pruning (at decoder layer dycoke_l = 3, each decode step: the last token's
  attention (mean over heads) to the video tokens at layer 2; when its cosine similarity to the previous step's
  is below 0.9, layers >= 3 attend to the top int((1 - p) N) video tokens of the full cache only, p = 0.7 in
  the README) is the KV policy `vtc/kv/dycoke.py`: `vtc.patch(model, "dycoke", kv="dycoke")`. It is not part of
  the strategy because vtc's strategies select once at prefill (DESIGN.md, section 4); KV policies act at decode.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .base import Strategy, VisualTokens, register_strategy
from .quota import _video_of


def video_rows(visual: VisualTokens) -> list[list[int]]:
    """Rows of `visual` grouped by video, each group in temporal order; an image, crop or tile is its own group."""
    layout = visual.context.get("layout")
    units = [int(u) for u in visual.image_index.tolist()] if visual.image_index is not None else []
    if layout is None or not units:
        return [[row] for row in range(visual.num_images)]
    groups: dict[tuple, list[int]] = {}
    for row, unit in enumerate(units):
        groups.setdefault(_video_of(layout, unit), []).append(row)
    return [sorted(rows, key=lambda r: units[r]) for rows in groups.values()]


def least_similar(x: torch.Tensor, reference: torch.Tensor, count: int) -> torch.Tensor:
    """(P, N) keep-mask: the `count` tokens of each frame of x (P, N, D) least cosine-similar to the token at the
    same position of `reference` (P, N, D); ties to the lower index."""
    similarity = F.cosine_similarity(F.normalize(x.float(), dim=-1), F.normalize(reference.float(), dim=-1), dim=-1)
    order = torch.sort(similarity, dim=1, stable=True).indices[:, :count]
    return torch.zeros(similarity.shape, dtype=torch.bool, device=x.device).scatter(1, order, True)


def ttm_keep(frames: torch.Tensor, count: int) -> torch.Tensor:
    """DyCoke's TTM on one video's frames (F, N, D): (F, N) keep-mask, `count` tokens per pruned frame."""
    n_frames, n, _ = frames.shape
    keep = torch.ones(n_frames, n, dtype=torch.bool, device=frames.device)
    if count >= n:
        return keep
    first = torch.arange(0, n_frames - 1, 2, device=frames.device)  # pairs (i, i + 1)
    if len(first):
        keep[first + 1] = least_similar(frames[first + 1], frames[first], count)
    fourth = torch.arange(0, max(n_frames - 4, 0), 4, device=frames.device)  # windows (i, i + 2), official bound
    if len(fourth):
        keep[fourth + 2] = least_similar(frames[fourth + 2], frames[fourth], count)
    return keep


@register_strategy
class DyCoke(Strategy):
    name = "dycoke"
    stage = "pre_llm"
    paper = "Tao et al., CVPR 2025, arXiv:2411.15024"
    default_keep = 0.3

    def __init__(self, keep: float | int = 0.3):
        super().__init__(keep)
        self.notes: list[str] = []

    def describe(self) -> str:
        return f"dycoke(keep={self.keep} of each pruned frame)"

    def frame_count(self, n: int) -> int:
        """Tokens a pruned frame of n keeps: int((1 - K) n) as the official code, or the int keep."""
        if isinstance(self.keep, numbers.Integral):
            return min(int(self.keep), n)
        return int(float(self.keep) * n + 1e-9)

    def select(self, visual: VisualTokens) -> torch.Tensor:
        keep = torch.ones(visual.num_images, visual.num_tokens, dtype=torch.bool, device=visual.features.device)
        count = self.frame_count(visual.num_tokens)
        single = 0
        for rows in video_rows(visual):
            if len(rows) < 2:
                single += 1
                continue
            keep[rows] = ttm_keep(visual.features[rows], count)
        self.notes = (
            [f"dycoke: {single} images/single frames kept whole (TTM compares frames of a video)"] if single else []
        )
        return keep
