"""FasterVLM: keep the visual tokens the vision tower's [CLS] attends to most, before the projector.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster", arXiv:2412.01818 (github.com/Theia-4869/FasterVLM). As in the official code
(llava/model/multimodal_encoder/clip_encoder.py `feature_select`, llava/model/llava_arch.py `encode_images`):

- score: the attention of the [CLS] query to each patch at the vision layer whose output feeds the projector
  (`attentions[select_layer]`, LLaVA-1.5: layer 22 of 24; softmax over all keys, the [CLS] column dropped),
  averaged over heads (`image_attentions.mean(dim=1)`);
- the image tokens are re-ranked by it and the top T kept (`topk`), the rest pruned before the projector
  (the projector is per token, so selecting after it keeps the same features); kept tokens stay in raster
  order at their original positions;
- T is given as a count (`--visual_token_num`); the README's settings are 75% / 90% / 95% reduction (144 / 58 /
  29 of 576). Default here: keep 0.25 (144 of 576).

Ours: ties go to the lower index (`topk` is unordered); on LLaVA-NeXT each crop and the base image keep the
same fraction (the official code does the same, per crop, with T per crop). On Qwen-VL, whose tower has no
[CLS], the adapter's [CLS] surrogate (see the README) stands in; SigLIP towers (OneVision) are refused.
"""

from __future__ import annotations

import torch

from .base import Strategy, VisualTokens, register_strategy


@register_strategy
class FasterVLM(Strategy):
    name = "fastervlm"
    aliases = ("faster_vlm",)
    stage = "pre_llm"
    paper = "Zhang et al., arXiv:2412.01818"
    default_keep = 0.25

    def __init__(self, keep: float | int = 0.25):
        super().__init__(keep)

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls": [feature_layer]}

    def describe(self) -> str:
        return f"fastervlm(keep={self.keep})"

    def score(self, visual: VisualTokens) -> torch.Tensor:
        (attention,) = visual.cls_attention.values()
        return attention.mean(dim=1)
