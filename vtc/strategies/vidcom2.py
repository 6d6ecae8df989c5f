"""VidCom2: frame budgets by frame uniqueness, then the most distinctive tokens of each frame.

Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language Models",
EMNLP 2025, arXiv:2505.14454 (github.com/xuyang-liu16/VidCom2; read: `token_compressor/vidcom2/vidcom2.py` at commit
d31b156, `vidcom2_compression`, and its Qwen2-VL hook `models/qwen2_vl.py`; the LLaVA-OneVision version
`llava/model/vidcom2.py` is the same algorithm). Per video, on its projected tokens x (T frames x n tokens, D
channels; OneVision: the pooled frame tokens; Qwen-VL: the merger's output, one frame = one temporal patch):

- channels: the D/2 (int) channels of least variance over all the video's tokens (`var(unbiased=False)`);
- tokens L2-normalised on those channels; video centre = mean of all tokens, frame centre = mean of the frame's;
- similarity to a centre: sum over alpha in {1/8, 1/4, 1/2, 1, 2} of exp(-||x - c||^2 / (2 alpha)); v for the
  video centre, f for the frame's;
- frame budget: s_t = -mean_tokens(v) (a frame unlike the video scores high), p = softmax((s - max s) / 0.01),
  scale_t = base (1 + p_t - mean p), at most 1; k_t = round(scale_t n) (half to even, `torch.round`), at least 1;
- tokens: the k_t of the frame with the lowest v + f (the least typical of the video and of the frame), kept in
  order at their original (t, h, w) positions (the official Qwen2-VL hook gathers the M-RoPE ids computed on the
  full sequence).

base is the retention ratio (official R_RATIO, default 0.25): our `keep` (an int keep: keep / n). Frames keep
different counts (the total is about base T n). Ours: computed in float32 (official: the model's dtype); ties in a
frame go to the lower index (official `topk` is unordered); the official code scores all videos of its batch-1
prompt together (one video in its scripts), vtc each video on its own. An image (or crop) is a one-frame video (then
scale = base: its lowest v + f tokens), where the official code prunes videos only. InternVL frames arrive as
pictures: `frames="sample"` takes a sample's pictures as one video's frames. Batched over a video's frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..local import PerThread
from .base import Strategy, VisualTokens, register_strategy
from .video_groups import FRAMES, video_rows

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)  # 2^k for k in -3..1
TEMPERATURE = 0.01


def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Multi-scale Gaussian kernel sum_alpha exp(-||x - c||^2 / (2 alpha)) over the last dim."""
    distance = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-distance / (2 * a)) for a in ALPHAS)


def vidcom2_mask(features: torch.Tensor, base: float) -> torch.Tensor:
    """(T, n) bool: VidCom2's kept tokens of one video's (T, n, D) features at retention ratio `base`."""
    frames, n, dim = features.shape
    x = features.float().reshape(frames * n, dim)
    channels = torch.topk(x.var(dim=0, unbiased=False), k=int(dim * 0.5), largest=False).indices
    x = F.normalize(x[:, channels].view(frames, n, -1), dim=-1)
    video = gaussian_similarity(x, x.mean(dim=(0, 1), keepdim=True))  # (T, n)
    frame = gaussian_similarity(x, x.mean(dim=1, keepdim=True))
    uniqueness = -video.mean(dim=-1)
    p = torch.softmax((uniqueness - uniqueness.max()) / TEMPERATURE, dim=0)
    scales = (base * (1 + p - p.mean())).clamp(max=1.0)
    counts = (scales * n).round().long().clamp(min=1)  # (T,)
    order = torch.sort(video + frame, dim=-1, stable=True).indices  # ascending: the least typical first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(frames, -1))
    return rank < counts[:, None]


@register_strategy
class VidCom2(Strategy):
    name = "vidcom2"
    aliases = ("video_compression_commander",)
    stage = "pre_llm"
    paper = "Liu et al., Video Compression Commander (VidCom2), EMNLP 2025, arXiv:2505.14454"
    default_keep = 0.25
    last_plan = PerThread([])  # per video of the last prefill: key, tokens kept per frame

    def __init__(self, keep: float | int = 0.25, frames: str = "video"):
        super().__init__(keep)
        if frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {frames!r}")
        self.frames = frames

    def describe(self) -> str:
        return f"vidcom2(keep={self.keep})"

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n = visual.num_tokens
        device = visual.features.device
        if visual.budget >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        base = self.keep / n if isinstance(self.keep, int) else float(self.keep)
        keep = torch.zeros(visual.num_images, n, dtype=torch.bool, device=device)
        plan = []
        for key, rows in video_rows(visual, self.frames):
            index = torch.tensor(rows, device=device)
            mask = vidcom2_mask(visual.features[index], base)
            keep[index] = mask
            plan.append(dict(video=key, kept=mask.sum(dim=1).tolist()))
        self.last_plan = plan
        return keep
