"""HoloV: share the budget among spatial partitions by a holistic score, then keep by attention inside each.

Zou et al., "Don't Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention",
NeurIPS 2025, arXiv:2510.02912 (github.com/obananas/HoloV). As in the official code (llava/model/utils.py
`HoloV`, called from llava/model/llava_arch.py with `num_patches=16, new_image_token_num=64`; the [CLS]
attention of `clip_encoder.py`'s feature layer, averaged over heads):

- the image's tokens, in raster order, are cut into P = 16 contiguous partitions (the first N % P one token
  longer);
- in a partition of n > 1 tokens, with S the cosine similarities of its projected features (norm + 1e-6) and
  the diagonal zeroed, each token's mean similarity m_i = sum_j S_ij / (n - 1) and its variance
  v_i = sum_j (S_ij - m_i)^2 / (n - 1) (the zeroed diagonal included); with a = 1000 x its [CLS] attention,
  its score is a_i + 0.09 * v_i * mean|a| / (mean|v| + 1e-6); the partition's score is the mean of its tokens'
  scores (a partition of one token: its attention);
- budget: partition p gets floor(T w_p) tokens, w_p = score_p / (sum + 1e-6); the T - sum left go one each to
  the partitions of largest w; a partition keeps its min(allocation, n) most attended tokens.

Ours: tokens stay in raster order at their original positions (the official code concatenates them partition
by partition in attention order, at consecutive positions); when a partition's allocation exceeds its size
the official code fills the missing slots with ZERO vectors, which we do not add: that image keeps fewer
tokens (the report shows it; images of one batch may then keep different counts); ties go to the lower index
(`topk` is unordered); computed in float32. `partitions=` changes P. On LLaVA-NeXT the official code runs once per
image over its packed tokens (base image and crops together, 64 in all); vtc gives each unit (base image, crop,
frame) its own budget and its own P partitions, as every vtc strategy. Default keep 64/576. On Qwen-VL the
adapter's [CLS] surrogate stands in (the official repository also has a Qwen2.5-VL version); SigLIP towers
(OneVision) are refused.
"""

from __future__ import annotations

import torch

from .base import Strategy, VisualTokens, register_strategy

ALPHA, EPS = 0.09, 1e-6


def partition_index(n: int, parts: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, s) token indices of each contiguous partition (padded by repeating its last token) and (P, s) mask."""
    sizes = torch.full((parts,), n // parts, device=device) + (torch.arange(parts, device=device) < n % parts)
    starts = sizes.cumsum(0) - sizes
    offset = torch.arange(int(sizes.max()), device=device)
    valid = offset[None] < sizes[:, None]
    index = (starts[:, None] + offset[None]).minimum(starts[:, None] + (sizes[:, None] - 1).clamp(min=0))
    return index.clamp(max=max(n - 1, 0)), valid


def holistic_scores(features: torch.Tensor, attention: torch.Tensor, index: torch.Tensor, valid: torch.Tensor):
    """(I, P) HoloV partition scores from features (I, N, D) and [CLS] attention (I, N)."""
    x = features.float()[:, index]  # (I, P, s, D)
    attn = attention.float()[:, index] * valid  # (I, P, s)
    size = valid.sum(dim=1).float()  # (P,)
    unit = x / (x.norm(dim=-1, keepdim=True) + EPS)
    sim = unit @ unit.transpose(-1, -2)
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(index.shape[1], dtype=torch.bool, device=index.device)
    sim = sim.masked_fill(~pair | eye, 0.0)
    others = (size - 1).clamp(min=1)[None, :, None]
    mean = sim.sum(dim=-1) / others
    var = (((sim - mean[..., None]) ** 2) * valid[None, :, None, :]).sum(dim=-1) / others
    scaled = attn * 1e3
    count = size[None, :]
    var_scale = (scaled.abs().sum(-1) / count) / ((var * valid).abs().sum(-1) / count + EPS)
    tokens = scaled + ALPHA * var * var_scale[..., None]
    scores = (tokens * valid).sum(-1) / count
    single = (size <= 1)[None].expand_as(scores)
    return torch.where(single, attn.sum(-1) / count.clamp(min=1), scores)


def allocate(scores: torch.Tensor, budget: int, nonempty: torch.Tensor) -> torch.Tensor:
    """(I, P) tokens per partition: floor(T w), the rest one each to the largest weights (stable order)."""
    weights = scores / (scores.sum(dim=1, keepdim=True) + EPS)
    allocated = (weights * budget).floor().long()
    remaining = budget - allocated.sum(dim=1, keepdim=True)
    order = torch.sort(weights.masked_fill(~nonempty, float("-inf")), dim=1, descending=True, stable=True).indices
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)
    return allocated + ((rank < remaining) & nonempty).long()


@register_strategy
class HoloV(Strategy):
    name = "holov"
    stage = "pre_llm"
    paper = "Zou et al., NeurIPS 2025, arXiv:2510.02912"
    default_keep = 64 / 576

    def __init__(self, keep: float | int = 64 / 576, partitions: int = 16):
        super().__init__(keep)
        if partitions < 1:
            raise ValueError(f"partitions={partitions}: pass an int >= 1 (official: 16)")
        self.partitions = int(partitions)

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls": [feature_layer]}

    def describe(self) -> str:
        return f"holov(keep={self.keep}, partitions={self.partitions})"

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        (attention,) = visual.cls_attention.values()
        attention = attention.float().mean(dim=1)  # (I, N)
        index, valid = partition_index(n, self.partitions, device)
        scores = holistic_scores(visual.features, attention, index, valid)
        allocated = allocate(scores, k, valid.any(dim=1)[None].expand_as(scores))
        attn = attention[:, index].masked_fill(~valid, float("-inf"))  # (I, P, s)
        order = torch.sort(attn, dim=-1, descending=True, stable=True).indices
        take = torch.arange(index.shape[1], device=device)[None, None] < allocated.clamp(max=valid.sum(1))[..., None]
        mask = torch.zeros(visual.num_images, n, dtype=torch.bool, device=device)
        picked = index[None].expand_as(order).gather(-1, order)  # (I, P, s) token ids in attention order
        rows = torch.arange(visual.num_images, device=device)[:, None, None].expand_as(picked)
        mask[rows[take], picked[take]] = True
        counts = mask.sum(dim=1)
        if bool((counts == counts[0]).all()):
            return mask.nonzero()[:, 1].view(visual.num_images, -1)
        return mask
