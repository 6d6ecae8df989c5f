"""DivPrune: keep the most diverse visual tokens (a max-min diversity subset), before the LLM.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025
(github.com/vbdi/divprune). As in the official code (LLaVA/llava/model/llava_arch.py, `DivPrune` and its call in
`prepare_inputs_labels_for_multimodal`):

- the tokens are the projected visual features as they enter the LLM (`new_input_embeds`, "LAYER_INDEX=0");
- distance d(i, j) = 1 - cosine(i, j);
- the first token is the one whose nearest other token is farthest (`topk(2, largest=False).values[1]`: the
  second-smallest distance of each column, the smallest being the token itself);
- every further step adds the token whose distance to its nearest selected token is largest (`min` over the
  selected rows, `argmax`), i.e. greedy farthest-point sampling: `vtc.ops.kcenter` seeded with that token;
- int(round(ratio * N)) tokens are kept (`SUBSET_RATIO`, 0.098 in the official scripts: 56 of 576), in their
  original order with their original positions.

Ours: `keep` rounds half up (the official `round` goes to even at exact halves); ties go to the lowest index
(the official `argmax` does the same); the norm has vtc.ops' 1e-12 floor. The official code selects once over
all of a LLaVA-NeXT image's tokens (base + crops together); vtc gives each unit (image, crop, frame) its own
budget, as every vtc strategy. Needs no probe: it runs on every adapter.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy


def divprune_seed(features: torch.Tensor) -> torch.Tensor:
    """(I,) the token of each image whose nearest other token (cosine distance) is farthest."""
    sim = ops.pairwise_cosine(features)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    return (1.0 - sim.max(dim=2).values).argmax(dim=1)


@register_strategy
class DivPrune(Strategy):
    name = "divprune"
    stage = "pre_llm"
    paper = "Alvar et al., CVPR 2025, arXiv:2503.02175"
    default_keep = 0.098

    def __init__(self, keep: float | int = 0.098):
        super().__init__(keep)

    def describe(self) -> str:
        return f"divprune(keep={self.keep})"

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        features = visual.features
        return ops.kcenter(features, k, first=divprune_seed(features)).sort(dim=1).values
