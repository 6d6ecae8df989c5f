"""VTC-CLS: keep the visual tokens the vision tower's [CLS] token attends to most.

Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", arXiv:2412.05819
(github.com/THU-MIG/VTC-CLS).

As in the official code (clip_encoder.py): score of patch j = sum over encoder layers `start_layer` .. the
feature layer (LLaVA-1.5: 22 of 24, the layer whose output feeds the projector) of the [CLS] query's
attention to j, averaged over heads; the [CLS] column is excluded. The top-k patches are kept and
re-sorted into raster order. Official default: start layer 16 of 24 (scaled to other depths as
round(16 / 24 * layers)); `start_layer = feature layer` uses a single layer. The official scripts keep 36
tokens of 576, hence the default keep of 0.0625. Nothing happens inside the LLM.
"""

from __future__ import annotations

import torch

from .base import Strategy, VisualTokens, register_strategy


@register_strategy
class VTCCLS(Strategy):
    name = "vtc_cls"
    aliases = ("vtccls", "vtc-cls")
    stage = "pre_llm"
    paper = "Wang et al., arXiv:2412.05819"
    default_keep = 0.0625

    def __init__(self, keep: float | int = 0.0625, start_layer: int | None = None):
        super().__init__(keep)
        self.start_layer = start_layer

    def layers(self, num_layers: int, feature_layer: int) -> list[int]:
        start = self.start_layer if self.start_layer is not None else round(16 / 24 * num_layers)
        if self.start_layer is not None and not 0 <= start <= feature_layer:
            raise ValueError(
                f"start_layer={start}, but the vision tower's feature layer is {feature_layer} (0-based, of "
                f"{num_layers} layers): pass start_layer in [0, {feature_layer}]"
            )
        start = min(start, feature_layer)
        return list(range(start, feature_layer + 1))

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls": self.layers(num_layers, feature_layer)}

    def describe(self) -> str:
        return f"vtc_cls(keep={self.keep}, start_layer={self.start_layer or 'auto'})"

    def score(self, visual: VisualTokens) -> torch.Tensor:
        return sum(attn.mean(dim=1) for attn in visual.cls_attention.values())
