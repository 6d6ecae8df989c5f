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

from collections.abc import Mapping, Sequence

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
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from ...budget import tokens_to_keep, validate_keep
from ...probes import vit_attention_received, vit_cls_attention, vit_keys
from . import KEEP_KWARG, make_strategy
from .select import select_images

VISION_PROBES = {"cls": vit_cls_attention, "received": vit_attention_received, "keys": vit_keys}
BUDGET_FIELD = "vtc_budget"  # per-image kept-token count, carried from the processor to embed_multimodal


def engine_settings(hf_config) -> dict | None:
    """The engine's "vtc" settings from hf_overrides, or None (the model is then vLLM's own)."""
    return getattr(hf_config, "vtc", None)


def image_budget(settings: dict, hf_kwargs: Mapping[str, object], n_tokens: int) -> int:
    """Tokens one image keeps: the request's mm_processor_kwargs "vtc_keep", else the engine's keep."""
    keep = hf_kwargs.get(KEEP_KWARG)
    if keep is None:
        keep = make_strategy(settings).keep
    validate_keep(keep, n_tokens)
    return tokens_to_keep(keep, n_tokens)


class VtcLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """Emits `budget` image placeholders per image instead of the full grid, and hands the budget to the model."""

    def _settings(self) -> dict | None:
        return engine_settings(self.info.get_hf_config())

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != KEEP_KWARG}  # vtc's, not the HF processor's
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _full_tokens(self, mm_items, item_idx: int) -> int:
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        settings = self._settings()
        pixels = processed_data.get("pixel_values")
        if settings is not None and pixels is not None:
            n_tokens = self.info.get_num_image_tokens(
                image_width=self.info.get_image_size_with_most_features().width,
                image_height=self.info.get_image_size_with_most_features().height,
            )  # LLaVA-1.5 resizes every image to the tower's square input: one count for all
            budget = image_budget(settings, hf_processor_mm_kwargs, n_tokens)
            processed_data[BUDGET_FIELD] = torch.full((len(pixels),), budget, dtype=torch.long)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if self._settings() is not None:
            fields[BUDGET_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        settings = self._settings()
        if settings is None or "image" not in mm_items:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            budget = image_budget(settings, hf_processor_mm_kwargs, self._full_tokens(mm_items, item_idx))
            return [image_token_id] * budget

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


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
        settings = engine_settings(self.config)
        self.vtc_strategy = make_strategy(settings) if settings is not None else None
        if self.vtc_strategy is not None:
            vision = self.config.vision_config
            if vision.model_type != "clip_vision_model":
                raise ValueError(f"vtc's vLLM plug-in serves LLaVA with a CLIP tower, not {vision.model_type!r}")
            layer = self.config.vision_feature_layer
            if not isinstance(layer, int):
                raise ValueError("vtc's vLLM plug-in serves LLaVA with one vision_feature_layer, not a list")
            n_layers = vision.num_hidden_layers
            self.vtc_feature_layer = layer - 1 if layer > 0 else n_layers + layer
            self.vtc_grid = (vision.image_size // vision.patch_size,) * 2
            self.vtc_probe_layers = self.vtc_strategy.vision_probes(n_layers, self.vtc_feature_layer)

    def _probe_hooks(self, probes: dict) -> list:
        layers = self.vision_tower.vision_model.encoder.layers
        drop_cls = self.config.vision_feature_select_strategy == "default"
        hooks = []
        for kind, layer_ids in self.vtc_probe_layers.items():
            for layer in layer_ids:
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
        budgets = kwargs.pop(BUDGET_FIELD, None)
        if self.vtc_strategy is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("image_embeds") is not None:
            raise ValueError("vtc's vLLM plug-in selects from pixel_values; image_embeds inputs are not supported")
        if kwargs.get("pixel_values") is None:
            return super().embed_multimodal(**kwargs)
        probes: dict = {}
        hooks = self._probe_hooks(probes)
        try:
            embeds = super().embed_multimodal(**kwargs)
        finally:
            for h in hooks:
                h.remove()
        budgets = [int(b) for b in torch.as_tensor(budgets).flatten().tolist()]
        return select_images(self.vtc_strategy, embeds, self.vtc_grid, budgets, probes)
