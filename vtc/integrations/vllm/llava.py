"""vtc's LLaVA-1.5 for vLLM: vLLM's own `LlavaForConditionalGeneration`, with visual tokens selected by a vtc
strategy in the multimodal-embedding step and the placeholder count fixed from the budget by the processor.

Imported by vLLM (lazily, through the registry entry that `vtc.integrations.vllm.register` adds); imports vLLM.
Without a "vtc" key in the engine's hf_config (set through `hf_overrides`) every method is vLLM's own.

Positions: vLLM numbers a 1-D-RoPE model's positions by slot in the (shortened) prompt, so kept tokens and the
text after them take consecutive positions here; `vtc.patch` in transformers keeps the original positions (with
gaps). Equality with transformers therefore holds against the unpatched model run on the compacted sequence with
consecutive positions (tests/vllm/test_vllm.py); the kept tokens are vtc's own selection either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from ...probes import vit_attention_received, vit_cls_attention, vit_keys
from . import make_strategy, served_budget
from .processor import (
    KEEP_FIELD,
    STRATEGY_FIELD,
    VtcProcessorMixin,
    engine_settings,
    image_settings,
    wanted_probes,
)
from .select import select_images

VISION_PROBES = {"cls": vit_cls_attention, "received": vit_attention_received, "keys": vit_keys}


class VtcLlavaMultiModalProcessor(VtcProcessorMixin, LlavaMultiModalProcessor):
    """Emits the budget's count of image placeholders per image instead of the full grid, and hands the request's
    strategy and keep to the model."""

    def _image_tokens(self) -> int:
        # LLaVA-1.5 resizes every image to the tower's square input: one token count for all images
        size = self.info.get_image_size_with_most_features()
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        settings = self._settings(hf_processor_mm_kwargs)
        if settings is None or "image" not in mm_items:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        mm_items.get_items("image", ImageProcessorItems)  # image_embeds inputs: not served (fails here)
        image_token_id = self.info.get_hf_config().image_token_index
        budget = served_budget(make_strategy(settings), self._image_tokens())
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id] * budget)]


def _build_processor(info, dummy_inputs):
    if isinstance(info, LlavaProcessingInfo):
        return VtcLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)  # Pixtral-HF: vLLM's own


class _SplitQKV:
    """A vLLM vision attention (packed qkv_proj) seen through the q_proj / k_proj interface of vtc's probes."""

    def __init__(self, attn: torch.nn.Module):
        self.attn = attn
        self.num_heads = attn.num_heads_per_partition
        self.head_dim, self.scale = attn.head_dim, attn.scale

    def _part(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        return self.attn.qkv_proj(hidden)[0].chunk(3, dim=-1)[i]

    def q_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._part(hidden, 0)

    def k_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._part(hidden, 1)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_llava_or_pixtral_hf_info, dummy_inputs=LlavaDummyInputsBuilder
)
class VtcLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with vtc's pre-LLM selection in `embed_multimodal` (when the engine's hf_config has "vtc")."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtc_settings = engine_settings(self.config)
        if self.vtc_settings is not None:
            make_strategy(self.vtc_settings, has_cls=True)  # fails at engine start, naming the fix
            vision = self.config.vision_config
            if vision.model_type != "clip_vision_model":
                raise ValueError(f"vtc's vLLM plug-in serves LLaVA with a CLIP tower, not {vision.model_type!r}")
            layer = self.config.vision_feature_layer
            if not isinstance(layer, int):
                raise ValueError("vtc's vLLM plug-in serves LLaVA with one vision_feature_layer, not a list")
            self.vtc_layers = vision.num_hidden_layers
            self.vtc_feature_layer = layer - 1 if layer > 0 else self.vtc_layers + layer
            self.vtc_grid = (vision.image_size // vision.patch_size,) * 2

    def _probe_hooks(self, wanted: dict[str, set[int]], probes: dict) -> list:
        """Hooks computing the probe rows `wanted` (kind -> layers) from q/k of vLLM's CLIP attention layers."""
        layers = self.vision_tower.vision_model.encoder.layers
        drop_cls = self.config.vision_feature_select_strategy == "default"
        hooks = []
        for kind, layer_ids in wanted.items():
            for layer in sorted(layer_ids):
                attn = layers[layer].self_attn
                view = _SplitQKV(attn)

                def hook(module, args, kwargs, kind=kind, layer=layer, view=view):
                    hidden = kwargs.get("hidden_states", args[0] if args else None)
                    with torch.no_grad():
                        rows = VISION_PROBES[kind](view, hidden)
                    probes.setdefault(kind, {})[layer] = rows[..., 1:] if drop_cls else rows

                hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        return hooks

    def embed_multimodal(self, **kwargs: object):
        strategy_ids, keeps = kwargs.pop(STRATEGY_FIELD, None), kwargs.pop(KEEP_FIELD, None)
        if self.vtc_settings is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("image_embeds") is not None:
            raise ValueError("vtc's vLLM plug-in selects from pixel_values; image_embeds inputs are not supported")
        if kwargs.get("pixel_values") is None:
            return super().embed_multimodal(**kwargs)
        per_image = image_settings(self.vtc_settings, strategy_ids, keeps)
        wanted = wanted_probes(per_image, (self.vtc_layers, self.vtc_feature_layer))
        probes: dict = {}
        hooks = self._probe_hooks(wanted, probes)
        try:
            embeds = super().embed_multimodal(**kwargs)
        finally:
            for h in hooks:
                h.remove()
        layers = (self.vtc_layers, self.vtc_feature_layer)
        return select_images(per_image, embeds, self.vtc_grid, probes, layers, has_cls=True)
