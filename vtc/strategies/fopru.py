"""FoPru (Focal Pruning): keep tokens by the attention they receive inside the vision encoder.

Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models", arXiv:2411.14164.
No official code was found; these choices are ours and documented as such:

- Token significance: the attention each patch receives at the feature layer (LLaVA-1.5: encoder layer 22,
  the layer feeding the projector), post-softmax, averaged over heads and over the patch queries; the
  [CLS] query is excluded. (The paper's "attention of the vision encoder"; computed in query chunks.)
- `mode="rank"`: global top-k by significance.
- `mode="row"`: rows of the token grid ranked by summed significance; the floor(k / cols) best rows are
  kept whole and the remaining k mod cols slots go to the most significant tokens of the next best row,
  so the budget is met exactly.
- Kept tokens are reordered to their original positions (the paper's third step).
"""

from __future__ import annotations

import torch

from .base import Strategy, VisualTokens, register_strategy, top_k_sorted


@register_strategy
class FoPru(Strategy):
    name = "fopru"
    aliases = ("focal_pruning",)
    stage = "pre_llm"
    paper = "Jiang et al., arXiv:2411.14164"
    default_keep = 0.25

    def __init__(self, keep: float | int = 0.25, mode: str = "rank", layer: int | None = None):
        super().__init__(keep)
        if mode not in ("rank", "row"):
            raise ValueError("mode must be 'rank' (global top-k) or 'row' (whole rows of the token grid)")
        self.mode = mode
        self.layer = layer

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"received": [feature_layer if self.layer is None else self.layer]}

    def describe(self) -> str:
        return f"fopru(keep={self.keep}, mode={self.mode})"

    def score(self, visual: VisualTokens) -> torch.Tensor:
        (attn,) = visual.received_attention.values()
        return attn.mean(dim=1)

    def select(self, visual: VisualTokens) -> torch.Tensor:
        scores = self.score(visual)
        rows, cols = visual.grid
        if self.mode == "rank" or rows * cols != visual.num_tokens:
            return top_k_sorted(scores, visual.budget)
        row_score = scores.view(-1, rows, cols).sum(dim=-1)
        full_rows, rest = divmod(visual.budget, cols)
        row_order = torch.sort(row_score, dim=-1, descending=True, stable=True).indices
        # bonus so that whole rows outrank everything, then the next row's tokens by their own score
        bonus = torch.zeros_like(row_score)
        top = float(scores.abs().max())
        bonus.scatter_(1, row_order[:, :full_rows], 2.0 * top + 1.0)
        if rest:
            bonus.scatter_(1, row_order[:, full_rows : full_rows + 1], top + 0.5)
        ranked = scores + bonus.repeat_interleave(cols, dim=1)
        return top_k_sorted(ranked, visual.budget)
