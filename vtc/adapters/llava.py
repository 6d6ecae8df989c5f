"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP ViT with [CLS], a projector, and a
Llama/Qwen2/Mistral-style decoder. Every image gives the same (H/patch x W/patch) grid of visual tokens."""

from __future__ import annotations

import torch

from ..probes import (
    vit_attention_received,
    vit_cls_attention,
    vit_cls_attention_single_head,
    vit_keys,
    vit_keys_concat,
)
from .base import Adapter, register_adapter
from .decoder import VisualLayout
from .vit_merge import TowerMerge, merge_probe, vision_merge_plan

VISION_PROBES = {
    "cls": vit_cls_attention,
    "received": vit_attention_received,
    "keys": vit_keys,
    "cls_single_head": vit_cls_attention_single_head,  # LLaVA-PruMerge+
    "keys_concat": vit_keys_concat,  # LLaVA-PruMerge+
}


@register_adapter
class LlavaAdapter(Adapter):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    vision_merge = True  # ToMe in the CLIP tower (vit_merge.py)

    @property
    def vision_layers(self):
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def has_cls(self) -> bool:
        return type(self.inner.vision_tower).__name__.startswith("CLIP")

    def grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def tokens_per_image(self) -> int:
        rows, cols = self.grid()
        return rows * cols + (self.model.config.vision_feature_select_strategy == "full")

    def num_vision_layers(self) -> int:
        return len(self.vision_layers)

    def feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        layer = layer if isinstance(layer, int) else layer[-1]
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of layer i
        return layer - 1 if layer > 0 else self.num_vision_layers() + layer

    def check(self, strategy) -> None:
        super().check(strategy)
        probes = strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        if probes.get("cls") and not self.has_cls():
            raise ValueError(
                f"strategy {strategy.name!r} reads [CLS] attention, but this vision tower "
                f"({type(self.inner.vision_tower).__name__}) has no [CLS] token; choose a strategy that does not"
            )
        vision_merge_plan(strategy, self)  # an in-tower merge plan that does not fit the tower fails here

    def install_capture(self, handle) -> None:
        image_token_id = self.model.config.image_token_id
        embed = self.inner.get_input_embeddings()

        def capture_visual(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is not None:
                self._pending_visual = input_ids == image_token_id
            elif kwargs.get("inputs_embeds") is not None:
                embeds = kwargs["inputs_embeds"]
                token = embed(torch.tensor(image_token_id, device=embeds.device))
                self._pending_visual = (embeds == token).all(-1)

        self._hooks.append(self.inner.register_forward_pre_hook(capture_visual, with_kwargs=True))

        drop_cls = self.model.config.vision_feature_select_strategy == "default"
        probes = handle.strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        for kind, layers in probes.items():
            for layer in layers:
                self._hooks.append(
                    self.vision_layers[layer].self_attn.register_forward_pre_hook(
                        self._probe_hook(kind, layer, drop_cls), with_kwargs=True
                    )
                )
        plan = vision_merge_plan(handle.strategy, self)
        if plan is not None:  # ToMe inside the vision tower; TowerMerge.remove() restores the layers at unpatch

            def report(state, layer=plan["layer"]):
                self._probes.setdefault("merge", {})[layer] = merge_probe(state, drop_cls)

            self._hooks.append(TowerMerge(self.vision_layers, plan, report))

    def _probe_hook(self, kind: str, layer: int, drop_cls: bool):
        probe = VISION_PROBES[kind]

        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                rows = probe(module, hidden)
            self._probes.setdefault(kind, {})[layer] = rows[..., 1:] if drop_cls else rows

        return hook

    def visual_layout(self, visual: torch.Tensor, n_visual: int) -> VisualLayout:
        per_image = self.tokens_per_image()
        if n_visual % per_image:
            raise ValueError(f"{n_visual} image tokens is not a multiple of {per_image} tokens per image")
        per_sample = (visual.sum(dim=1) // per_image).tolist()
        sample_of_image = [b for b, n in enumerate(per_sample) for _ in range(n)]
        n_images = n_visual // per_image
        grid = self.grid() if self.model.config.vision_feature_select_strategy == "default" else (1, per_image)
        return VisualLayout([per_image] * n_images, [grid] * n_images, sample_of_image)
