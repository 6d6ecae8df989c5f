"""ToMe: token merging by bipartite soft matching, placed once between the projector and the LLM.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (github.com/facebookresearch/ToMe). The
matching rule is the official `bipartite_soft_matching` (tome/merge.py): tokens alternate into sets A
(even) and B (odd); each A token finds its most cosine-similar B token; the r A tokens with the best
matches are merged into their B token by a size-weighted average (`merge_wavg`), sizes add up. The metric
is the attention keys averaged over heads (tome/patch/timm.py, `ToMeAttention.forward` returns
`k.mean(1)`). We call `vtc.ops.bipartite_merge`, which keeps the surviving tokens in their original order.

The paper merges r tokens in every ViT block. Here ToMe is one pre-LLM step to a token budget (our choice,
so that it composes with the other strategies and the vision tower is untouched):

- Repeated rounds of bipartite merging until k tokens remain: each round removes r = min(n - k, ceil(n / 2))
  tokens (as many as the A set allows), so 576 -> 64 takes 4 rounds.
- Metric (`metric="keys"`, default): the keys of the vision encoder's feature layer (the layer whose output
  feeds the projector), averaged over heads, as ToMe uses the current block's keys. Between rounds there is
  no next block to recompute keys from, so the metric is merged along with the features (size-weighted
  average). `metric="features"` matches on the projected features instead.
- Merged features: size-weighted averages of the projected features (the tokens entering the LLM).
- Positions: a merged token sits at its representative, the B token that survived (recursively), so the
  output keeps raster order and original position ids. ToMe's proportional attention (log size added to
  the attention logits) is not applied inside the LLM.
- The in-tower placement (r tokens per ViT block, changing the tower's sequence length) is not provided.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy


def merge_to_budget(
    features: torch.Tensor, metric: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeated ToMe merges of (I, N, D) features matched on (I, N, C) metric until k tokens remain.

    Returns (representative indices (I, k) ascending, merged features (I, k, D), sizes (I, k, 1))."""
    images, n, dim = features.shape
    index = torch.arange(n, device=features.device).expand(images, -1)
    x = torch.cat([features.float(), metric.float()], dim=-1)
    size = None
    while x.shape[1] > k:
        n = x.shape[1]
        r = min(n - k, (n + 1) // 2)
        x, size, keep = ops.bipartite_merge(x, r, size=size, metric=x[..., dim:], return_index=True)
        index = index.gather(1, keep)
    if size is None:
        size = torch.ones(images, n, 1, device=features.device)
    return index, x[..., :dim].to(features.dtype), size


@register_strategy
class ToMe(Strategy):
    name = "tome"
    aliases = ("token_merging",)
    stage = "pre_llm"
    paper = "Bolya et al., ICLR 2023, arXiv:2210.09461"
    default_keep = 0.25

    def __init__(self, keep: float | int = 0.25, metric: str = "keys", layer: int | None = None):
        super().__init__(keep)
        if metric not in ("keys", "features"):
            raise ValueError("metric must be 'keys' (feature-layer keys, as ToMe) or 'features' (projected features)")
        self.metric = metric
        self.layer = layer

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        if self.metric != "keys":
            return {}
        layer = feature_layer if self.layer is None else self.layer
        return {"keys": [layer]}

    def describe(self) -> str:
        return f"tome(keep={self.keep}, metric={self.metric})"

    def select(self, visual: VisualTokens):
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        if self.metric == "keys":
            (keys,) = visual.vision["keys"].values()
            metric = keys.transpose(1, 2)  # (I, N, head_dim): keys averaged over heads
        else:
            metric = visual.features
        index, merged, _ = merge_to_budget(visual.features, metric, k)
        return index, merged
