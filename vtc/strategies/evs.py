"""EVS: Efficient Video Sampling, drop the video tokens nearly equal to the same place in the previous frame.

"Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference", arXiv:2510.14624, 2025;
the code is vLLM's `vllm/multimodal/evs.py` (github.com/vllm-project/vllm, read at commit 094f117:
`compute_retained_tokens_count`, `compute_retention_mask`), which vLLM's video models apply to each video's
embeddings after the vision encoder and projector, before the LLM. As there, per video of T frames (Qwen-VL:
temporal patches) of n tokens each, D channels:

- dissimilarity of the token at (t, h, w) = 1 - cosine(x[t, h, w], x[t - 1, h, w]) (`F.cosine_similarity`), and 255
  for every token of the first frame, so the first frame is always kept whole;
- retained = max(n, int(T n (1 - q))), q the pruning rate: the `retained` most dissimilar tokens of the whole video
  (a stable descending sort of the flattened (T, h, w) scores: ties go to the earlier token) are kept, in their
  original order at their original (t, h, w) positions (vLLM builds the media's M-RoPE ids on the full grid,
  `compute_mrope_for_media`, and patches them into the prompt's positions), so frames keep different counts.

Ours: `keep` is the retention rate 1 - q (retained = max(n, int(T n keep))); an int keep is tokens per frame on
average (retained = max(n, keep T)). Scores are computed in float32 (vLLM: in the embeddings' dtype). Images have no
previous frame and vLLM's code prunes videos only: EVS refuses an image (or a LLaVA-NeXT crop) it is asked to prune,
naming the video-only rule (a keep that leaves an image whole, e.g. 1.0, passes it through). Frames are the
adapter's video units (OneVision: a pooled frame; Qwen2-VL / 2.5-VL / 3-VL: a temporal patch); InternVL receives
videos as pictures: `frames="sample"` takes the pictures of a sample as the consecutive frames of one video.
Selection is one batched sort per video.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..local import PerThread
from .base import Strategy, VisualTokens, register_strategy
from .video_groups import FRAMES, video_rows

FIRST_FRAME = 255.0  # vLLM's dissimilarity of first-frame tokens (any cosine distance is at most 2)


def evs_retained(n: int, frames: int, keep: float | int) -> int:
    """Tokens a video of `frames` frames of n tokens keeps: max(n, int(frames n keep)), or max(n, keep frames)."""
    total = keep * frames if isinstance(keep, int) else int(frames * n * float(keep))
    return min(frames * n, max(n, total))


def evs_mask(features: torch.Tensor, retained: int) -> torch.Tensor:
    """(T, n) bool: the `retained` tokens of one video's (T, n, D) features most unlike the previous frame's."""
    frames, n, _ = features.shape
    x = features.float()
    dissimilarity = torch.cat(
        [x.new_full((1, n), FIRST_FRAME), 1.0 - F.cosine_similarity(x[1:], x[:-1], dim=-1)], dim=0
    )
    order = torch.sort(dissimilarity.reshape(-1), descending=True, stable=True).indices[:retained]
    mask = torch.zeros(frames * n, dtype=torch.bool, device=features.device)
    mask[order] = True
    return mask.view(frames, n)


@register_strategy
class EVS(Strategy):
    name = "evs"
    aliases = ("efficient_video_sampling",)
    stage = "pre_llm"
    paper = "Efficient Video Sampling, arXiv:2510.14624, 2025 (vLLM vllm/multimodal/evs.py)"
    default_keep = 0.25
    video_only = True  # image prompts are refused at their first forward
    last_plan = PerThread([])  # per video of the last prefill: key, tokens kept per frame

    def __init__(self, keep: float | int = 0.25, frames: str = "video"):
        super().__init__(keep)
        if frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {frames!r}")
        self.frames = frames

    def describe(self) -> str:
        return f"evs(keep={self.keep})"

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        keep = torch.ones(visual.num_images, n, dtype=torch.bool, device=device)
        plan = []
        for key, rows in video_rows(visual, self.frames):
            if key[0] == "unit":  # an image or crop: no previous frame
                if k < n:
                    raise ValueError(
                        "strategy 'evs' prunes video frames only (each token is compared with the previous frame's; "
                        "vLLM never prunes images), and this prompt has an image or crop to prune: use an image "
                        "strategy (e.g. 'divprune'), keep=1.0, or frames='sample' when a sample's pictures are the "
                        "frames of one video"
                    )
                continue
            index = torch.tensor(rows, device=device)
            mask = evs_mask(visual.features[index], evs_retained(n, len(rows), self.keep))
            keep[index] = mask
            plan.append(dict(video=key, kept=mask.sum(dim=1).tolist()))
        self.last_plan = plan
        return keep
