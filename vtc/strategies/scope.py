"""SCOPE: saliency-coverage oriented token pruning (greedy facility location weighted by [CLS] saliency).

Deng, Li, Zhou, He, "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs", NeurIPS 2025,
arXiv:2510.24214 (github.com/kinredon/SCOPE: `scope/clip_encoder.py`, `CLIPVisionTower_SCOPE` and `SCOPE`; ported to
Tencent/AngelSlim as `angelslim/compressor/token_compressor/algorithm/scope.py`).

As in the official code, per image, k = round(N * keep) greedy steps over the cosine similarity S of the tokens: with
c_i the coverage of token i so far (max similarity to a selected token, from 0), every unselected token j gains
g_j = sum over unselected i of max(0, S_ij - c_i) (its token-coverage gain), multiplied by its saliency a_j ** alpha;
the largest g_j * a_j ** alpha is selected (first index on ties) and the coverages updated. The saliency a is the
[CLS] attention at the feature layer (official `attentions[-2]` of CLIP: LLaVA-1.5's layer 22 of 24), softmax over
all keys, summed over heads; alpha = 1 (`ALPHA=1.0` in the official scripts). No attention map is materialised: the
saliency is the [CLS] row computed from q/k. Kept tokens keep their raster order. Default keep 64 / 576.

Where we differ, and why:
- S is the cosine similarity of the projected visual tokens (the LLM input; AngelSlim's port does the same); the
  official code uses the CLIP feature-layer hidden states before the projector, which vtc's probes do not carry.
- Each image (crop, frame) has its own budget; the official LLaVA code splits one budget evenly over a batch's
  images and AngelSlim's port selects over all of a sample's visual tokens at once.
- Towers without [CLS]: Qwen uses vtc's [CLS] surrogate (attention received, as AngelSlim's Qwen port does); SigLIP
  (OneVision) is refused.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy


def scope_select(features: torch.Tensor, saliency: torch.Tensor, k: int, alpha: float = 1.0) -> torch.Tensor:
    """(I, k) indices in pick order: the official greedy saliency-weighted facility location, batched over images;
    features (I, N, D), saliency (I, N)."""
    similarity = ops.pairwise_cosine(features.float())  # (I, N, N)
    images, n = saliency.shape
    rows = torch.arange(images, device=features.device)
    weight = saliency.float() ** alpha
    selected = torch.zeros(images, n, dtype=torch.bool, device=features.device)
    coverage = torch.zeros(images, n, device=features.device)
    out = torch.empty(images, k, dtype=torch.long, device=features.device)
    for step in range(k):  # k greedy steps, each batched over images and tokens
        gain = (similarity.masked_fill(selected[:, :, None], 0.0) - coverage[:, :, None]).clamp(min=0).sum(dim=1)
        best = (gain * weight).masked_fill(selected, float("-inf")).argmax(dim=1)
        out[:, step] = best
        selected[rows, best] = True
        coverage = torch.maximum(coverage, similarity[rows, best])
    return out


@register_strategy
class Scope(Strategy):
    name = "scope"
    stage = "pre_llm"
    paper = "Deng et al., NeurIPS 2025, arXiv:2510.24214"
    default_keep = 64 / 576

    def __init__(self, keep: float | int = 64 / 576, alpha: float = 1.0, layer: int | None = None):
        super().__init__(keep)
        self.alpha = float(alpha)
        self.layer = layer

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls": [feature_layer if self.layer is None else int(self.layer)]}

    def describe(self) -> str:
        return f"scope(keep={self.keep:.3g}, alpha={self.alpha})"

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        (cls,) = visual.cls_attention.values()
        return scope_select(visual.features, cls.sum(dim=1), k, self.alpha).sort(dim=1).values
