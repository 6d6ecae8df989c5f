"""HiPrune: training-free pruning by the hierarchical attention of the vision encoder (anchor, buffer, register).

Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders",
arXiv:2508.00553 (github.com/Danielement321/HiPrune: `LLaVA/llava/model/llava_arch.py`, `encode_images`; ported to
Tencent/AngelSlim as `angelslim/compressor/token_compressor/algorithm/hiprune.py`).

As in the official code, per image with budget N' (the official `HIPRUNE_RETENTION`, here round(N * keep)):
- the "global attention" of a layer: the attention each patch receives, averaged over heads and over ALL queries
  ([CLS] included), the [CLS] column dropped;
- anchors: the round(N' * alpha / 5) patches with the most global attention at the middle "object layer"
  (official 9, 1-based, of CLIP's 24: index 8, scaled to the tower's depth; Qwen2.5-VL: 16 of 32, used here for
  towers without [CLS]); buffers: each anchor's 4 neighbours (index -1, +1, -W, +W, clamped to [0, N-1] as the
  official code does, so a row's first token's "left" neighbour is the previous row's last);
- registers: the rest of the budget, the patches with the most global attention at the feature layer (official
  `mm_vision_select_layer`, LLaVA-1.5: 22 of 24), anchors and buffers excluded.
alpha = 0.1; keep 1/3 (192 of 576, the official first setting). Kept tokens keep their raster order.

Where we differ, and why:
- The global attention comes from two q/k probes instead of `output_attentions`: the attention received averaged
  over the patch queries (`received`) and the [CLS] query's row (`cls`), combined as (n * received + cls) / (n + 1)
  with n the unit's tokens; exact on LLaVA-1.5, approximate (n is not the tower's patch count) on LLaVA-NeXT's
  unpadded crops and InternVL's 2x2 groups. Towers without [CLS] (Qwen, SigLIP) use the received attention alone.
- AngelSlim's port differs from the official code (the [CLS] attention, not the global one; object layer 9 as a
  0-based index; at least one anchor from 5 tokens on); we follow the official repository.
"""

from __future__ import annotations

import torch

from .base import Strategy, VisualTokens, register_strategy, top_k_sorted


def hiprune_select(shallow: torch.Tensor, deep: torch.Tensor, budget: int, width: int, alpha: float) -> torch.Tensor:
    """(I, N) keep-mask: anchors (top round(budget * alpha / 5) of `shallow`) and their 4 neighbours, then the top of
    `deep` among the rest up to `budget` per image; shallow, deep (I, N)."""
    images, n = shallow.shape
    anchors = round(budget * alpha / 5)
    chosen = torch.zeros(images, n, dtype=torch.bool, device=shallow.device)
    if anchors > 0:
        top = shallow.topk(anchors, dim=1).indices
        around = torch.cat([top, top - 1, top + 1, top - width, top + width], dim=1).clamp(0, n - 1)
        chosen.scatter_(1, around, True)
    registers = (budget - chosen.sum(dim=1)).clamp(min=0)  # (I,): images may have different numbers of buffers
    order = torch.sort(deep.masked_fill(chosen, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
    return chosen | (rank < registers[:, None])


@register_strategy
class HiPrune(Strategy):
    name = "hiprune"
    stage = "pre_llm"
    paper = "Liu et al., arXiv:2508.00553"
    default_keep = 192 / 576

    def __init__(self, keep: float | int = 192 / 576, alpha: float = 0.1, object_layer: int | None = None):
        super().__init__(keep)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha}: pass the share of the budget for anchors and buffers, in [0, 1]")
        self.alpha = float(alpha)
        self.object_layer = object_layer
        self._has_cls = True
        self._layers = (-1, -1)  # (object layer, feature layer), set by vision_probes

    def check_adapter(self, adapter) -> None:
        self._has_cls = adapter.has_cls()

    def layers(self, num_layers: int, feature_layer: int) -> tuple[int, int]:
        """(object layer, feature layer), 0-based."""
        if self.object_layer is not None:
            shallow = int(self.object_layer)
        elif self._has_cls:
            shallow = round(9 / 24 * num_layers) - 1  # official HIPRUNE_OBJECT_LAYER 9 (1-based) of CLIP's 24
        else:
            shallow = round(16 / 32 * num_layers) - 1  # official 16 (1-based) of Qwen2.5-VL's 32
        if not 0 <= shallow < num_layers:
            raise ValueError(f"object_layer={shallow}: pass a 0-based vision layer in [0, {num_layers - 1}]")
        return shallow, feature_layer

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        self._layers = self.layers(num_layers, feature_layer)
        layers = sorted(set(self._layers))
        return {"received": layers, "cls": layers} if self._has_cls else {"received": layers}

    def describe(self) -> str:
        return f"hiprune(keep={self.keep:.3g}, alpha={self.alpha}, object_layer={self.object_layer or 'auto'})"

    def global_attention(self, visual: VisualTokens, layer: int) -> torch.Tensor:
        received = visual.received_attention[layer].mean(dim=1)
        if not self._has_cls:
            return received
        n = visual.num_tokens
        return (n * received + visual.cls_attention[layer].mean(dim=1)) / (n + 1)

    def select(self, visual: VisualTokens) -> torch.Tensor:
        """(I, k) sorted indices, or a keep-mask (I, N) with k per image (more only if anchors and buffers exceed k)."""
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        shallow_layer, deep_layer = self._layers
        deep = self.global_attention(visual, deep_layer)
        if self.alpha == 0:
            return top_k_sorted(deep, k)
        shallow = self.global_attention(visual, shallow_layer)
        return hiprune_select(shallow, deep, k, visual.grid[1], self.alpha)
