"""VisPruner: important tokens by [CLS] attention, plus diverse tokens left after removing duplicates.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs",
ICCV 2025, arXiv:2412.01818 (github.com/Theia-4869/VisPruner). As in the official code
(llava/model/llava_arch.py `encode_images`, llava/model/multimodal_encoder/clip_encoder.py `feature_select`):

- [CLS] attention at the vision layer that feeds the projector (LLaVA-1.5: 22 of 24), averaged over heads;
  the tokens sorted by it, descending;
- important tokens: the first int(T * r) of that order (T = tokens kept, r = `important_ratio`, default 0.5);
- diverse tokens: the rest, still in attention order, are thinned by rounds of bipartite matching until
  T - int(T * r) remain: per round, A = even and B = odd places of the current order, each A token's score is
  its largest cosine similarity to a B token, and the min(8, R - target) A tokens with the highest score are
  removed; the next round's order is the surviving A tokens (in decreasing score) then every B token;
- kept tokens return to raster order at their original positions.

Ours: the similarity is computed on the projected features a pre-LLM strategy sees (the official code uses the
vision tower's features before the projector, which vtc's adapters do not expose; the projector is non-linear,
so near-duplicates may rank differently); sorts are stable (ties to the earlier place; the official
`argsort` is unordered on ties); the norm has vtc.ops' 1e-12 floor. Default keep 128/576 with r = 0.5 (the
README's first example: 64 important + 64 diverse). On Qwen-VL the adapter's [CLS] surrogate stands in;
SigLIP towers (OneVision) are refused.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy


def remove_duplicates(features: torch.Tensor, order: torch.Tensor, target: int, step: int = 8) -> torch.Tensor:
    """VisPruner's duplicate removal: (I, R) token indices in attention order -> (I, target) survivors.

    features (I, N, D). Each round drops the min(step, R - target) even-place tokens most similar to an
    odd-place token; the survivors are re-ordered as [kept even-place tokens by decreasing score, odd ones]."""
    if target == 0:  # no diverse token asked: the official loop does not run
        return order[:, :0]
    rows = torch.arange(features.shape[0], device=features.device)[:, None]
    while order.shape[1] > target:
        r = min(step, order.shape[1] - target)
        a, b = order[:, ::2], order[:, 1::2]
        scores = ops.pairwise_cosine(features[rows, a], features[rows, b]).max(dim=2).values
        distinct = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, r:]
        order = torch.cat([a.gather(1, distinct), b], dim=1)
    return order


@register_strategy
class VisPruner(Strategy):
    name = "vispruner"
    aliases = ("vis_pruner",)
    stage = "pre_llm"
    paper = "Zhang et al., ICCV 2025, arXiv:2412.01818"
    default_keep = 128 / 576

    def __init__(self, keep: float | int = 128 / 576, important_ratio: float = 0.5):
        super().__init__(keep)
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"important_ratio={important_ratio}: pass a fraction in [0, 1] (official default 0.5)")
        self.important_ratio = float(important_ratio)

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls": [feature_layer]}

    def describe(self) -> str:
        return f"vispruner(keep={self.keep}, important_ratio={self.important_ratio})"

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        (attention,) = visual.cls_attention.values()
        ranked = torch.sort(attention.mean(dim=1), dim=1, descending=True, stable=True).indices
        n_important = int(k * self.important_ratio)
        diverse = remove_duplicates(visual.features, ranked[:, n_important:], k - n_important)
        return torch.cat([ranked[:, :n_important], diverse], dim=1).sort(dim=1).values
