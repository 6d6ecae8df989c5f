"""vtc's Qwen2.5-VL and Qwen2-VL for vLLM: vLLM's own model classes, with visual tokens selected by a vtc strategy in
the multimodal-embedding step and each image's placeholder count fixed from the budget by the processor.

Imported by vLLM (lazily, through the registry entries that `vtc.integrations.vllm.register` adds); imports vLLM.
Without a "vtc" key in the engine's hf_config every method is vLLM's own.

Positions (M-RoPE): as in vtc.patch, kept tokens keep their original (t, h, w) positions and the text its original
positions (vtc/integrations/vllm/mrope.py). `get_mrope_input_positions` gives the text its positions at request time;
each kept token's (t, h, w) offset in its image's grid travels as 3 extra channels of its embedding, the way vLLM's
EVS video pruning carries positions (`_postprocess_video_embeds_evs`), through the encoder cache and chunked
prefill's slicing; `embed_input_ids` takes the channels off and `forward` adds them to the image tokens' positions.
vLLM's EVS applies them in the model runner instead (`recompute_mrope_positions`), which runs only where video
pruning is on and, in vLLM 0.32, not in the CPU runner; applying them in the model works in every runner.

Probes: the "cls"/"received" surrogate and the "keys" probe of vtc's Qwen-VL adapter (vtc/adapters/qwen2_vl.py),
computed by the same functions from q and k of vLLM's vision attention (with its vision RoPE), per image, within the
layer's attention segments (the image, or Qwen2.5-VL's windows), then put from window order into raster order.

Images only: a vtc engine must be started with `limit_mm_per_prompt={"video": 0}` and refuses videos (vLLM's own
`--video-pruning-rate` prunes videos, on an engine without vtc); image embeddings given instead of pixels are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...adapters.qwen2_vl import attention_received, merged_keys
from . import make_strategy, served_budget
from .mrope import OFFSET_CHANNELS, add_offsets, kept_offsets, prompt_positions
from .processor import KEEP_FIELD, STRATEGY_FIELD, VtcProcessorMixin, engine_settings, image_settings, wanted_probes
from .select import select_images

VIDEO_REFUSED = (
    "vtc's vLLM plug-in compresses images; video inputs in a vtc engine are refused (vLLM's --video-pruning-rate "
    "prunes Qwen-VL videos on an engine without vtc)"
)


class _VtcQwenProcessor(VtcProcessorMixin):
    """Each image gets its budget's count of placeholders instead of its grid's token count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        settings = self._settings(hf_processor_mm_kwargs)
        if settings is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if "video" in mm_items:
            raise ValueError(VIDEO_REFUSED)
        strategy = make_strategy(settings, has_cls=False)  # as vtc.patch on Qwen-VL (no [CLS]); HiRED refuses
        image_token = self.info.get_hf_config().image_token_id
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def replacement(item: int) -> list[int]:
            grid = out_mm_kwargs["image"][item]["image_grid_thw"].data
            return [image_token] * served_budget(strategy, int(grid.prod()) // merge**2)

        return [PromptReplacement(modality="image", target=[image_token], replacement=partial(replacement))]


class VtcQwen2_5_VLMultiModalProcessor(_VtcQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


class VtcQwen2VLMultiModalProcessor(_VtcQwenProcessor, Qwen2VLMultiModalProcessor):
    pass


def _vision_qk(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q and k, each (heads, S, head_dim) fp32 with the vision RoPE, of a vLLM Qwen-VL vision attention (fused qkv:
    the q, k, v thirds one after the other), computed as its forward computes them; x: (S, 1, D), its input."""
    qkv, _ = attn.qkv(x)
    seq, heads, dim = qkv.shape[0], attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    q, k, _ = qkv.view(seq, 3, heads, dim).unbind(1)
    rotated = attn.apply_rotary_emb(torch.stack([q, k]).contiguous(), cos, sin)  # (2, S, heads, head_dim)
    return rotated[0].transpose(0, 1).float(), rotated[1].transpose(0, 1).float()


class _VtcQwenVL:
    """The model side, mixed in before vLLM's Qwen2-VL / Qwen2.5-VL class."""

    def _vtc_init(self, multimodal_config) -> None:
        self.vtc_settings = engine_settings(self.config)
        self._vtc_offsets = None  # (is_media mask, offsets) between embed_input_ids and forward
        if self.vtc_settings is None:
            return
        make_strategy(self.vtc_settings, has_cls=False)  # fails at engine start, naming the fix
        if multimodal_config is not None and multimodal_config.is_multimodal_pruning_enabled():
            raise ValueError("vtc and vLLM's video pruning (--video-pruning-rate) cannot run in one engine")
        if multimodal_config is not None and multimodal_config.get_limit_per_prompt("video") > 0:
            raise ValueError(
                f"{VIDEO_REFUSED}: start the engine with limit_mm_per_prompt={{'video': 0}} (server: "
                """--limit-mm-per-prompt '{"video": 0}'), so that vLLM plans no video inputs"""
            )
        self.vtc_layers = len(self.visual.blocks)
        self.vtc_feature_layer = self.vtc_layers - 1  # the merger reads the last block's output
        self.vtc_merge = self.config.vision_config.spatial_merge_size

    def get_encoder_cudagraph_config(self):
        """No encoder CUDA graphs for images with vtc on: their replay would skip `embed_multimodal`'s selection."""
        config = super().get_encoder_cudagraph_config()
        if self.vtc_settings is None:
            return config
        return dataclasses.replace(config, modalities=[m for m in config.modalities if m != "image"])

    # --- request time: text positions --------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.vtc_settings is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        spans = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(VIDEO_REFUSED)
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            grid = (t, h // self.vtc_merge, w // self.vtc_merge)
            spans.append((feature.mm_position.offset, feature.mm_position.length, grid))
        return prompt_positions(len(input_tokens), spans)

    # --- encoder step: selection ---------------------------------------------------------------------------------
    def _segments(self, grid: list[int], layer: int) -> torch.Tensor:
        """Attention segment bounds of one image at a vision layer, in patches (its window order)."""
        t, h, w = grid
        windowed = hasattr(self.visual, "fullatt_block_indexes") and layer not in self.visual.fullatt_block_indexes
        if windowed:
            _, bounds = self.visual.get_window_index_thw(t, h, w)
            return torch.cat([bounds.new_zeros(1), bounds.to(torch.long)])
        return torch.arange(t + 1) * (h * w)

    def _raster_order(self, grid: list[int]) -> torch.Tensor | None:
        """Merged tokens of one image from the tower's order to raster order (Qwen2.5-VL runs window by window)."""
        if not hasattr(self.visual, "get_window_index_thw"):
            return None
        window_index, _ = self.visual.get_window_index_thw(*grid)
        return torch.argsort(window_index.to(torch.long))

    def _probe_hooks(self, wanted: dict[str, set[int]], grids: list[list[int]], probes: dict) -> list:
        """Hooks computing, per image, the probe rows `wanted` (kind -> layers) from q/k of vLLM's vision layers.
        probes[kind][layer] becomes a list, per image, of (channels, tokens) rows in raster order."""
        unit = self.vtc_merge**2
        sizes = [t * h * w for t, h, w in grids]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        orders = [self._raster_order(g) for g in grids]
        hooks = []
        for layer in sorted({layer for layers in wanted.values() for layer in layers}):
            kinds = [kind for kind, layers in wanted.items() if layer in layers]
            attn = self.visual.blocks[layer].attn

            def hook(module, args, kwargs, kinds=kinds, layer=layer):
                x = kwargs.get("x", args[0] if args else None)
                with torch.no_grad():
                    q, k = _vision_qk(module, x, kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"])
                    scale = module.hidden_size_per_attention_head**-0.5
                    for image, (start, size, grid, order) in enumerate(zip(starts, sizes, grids, orders)):
                        qi, ki = q[:, start : start + size], k[:, start : start + size]
                        values = {}
                        if {"cls", "received"} & set(kinds):
                            received = attention_received(qi, ki, self._segments(grid, layer), scale)
                            values["cls"] = values["received"] = received.view(received.shape[0], -1, unit).mean(-1)
                        if "keys" in kinds:
                            values["keys"] = merged_keys(ki, unit)
                        for kind in kinds:
                            rows = values[kind] if order is None else values[kind][:, order.to(q.device)]
                            probes.setdefault(kind, {}).setdefault(layer, {})[image] = rows

            hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        return hooks

    def embed_multimodal(self, **kwargs: object):
        strategy_ids, keeps = kwargs.pop(STRATEGY_FIELD, None), kwargs.pop(KEEP_FIELD, None)
        if self.vtc_settings is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError(VIDEO_REFUSED)
        if kwargs.get("image_embeds") is not None:
            raise ValueError("vtc's vLLM plug-in selects from pixel_values; image_embeds inputs are not supported")
        if kwargs.get("pixel_values") is None:
            return super().embed_multimodal(**kwargs)
        grids = torch.as_tensor(kwargs["image_grid_thw"]).view(-1, 3).tolist()
        per_image = image_settings(self.vtc_settings, strategy_ids, keeps)
        vision_layers = (self.vtc_layers, self.vtc_feature_layer)
        probes: dict = {}
        hooks = self._probe_hooks(wanted_probes(per_image, vision_layers), grids, probes)
        try:
            embeds = super().embed_multimodal(**kwargs)
        finally:
            for h in hooks:
                h.remove()
        out = []
        for image, (settings, features, (_, gh, gw)) in enumerate(zip(per_image, embeds, grids)):
            grid = (gh // self.vtc_merge, gw // self.vtc_merge)
            rows = {kind: {layer: by_image[image][None] for layer, by_image in by_layer.items()}
                    for kind, by_layer in probes.items()}  # fmt: skip
            ((index, kept),) = select_images(
                [settings], features[None], grid, rows, vision_layers, with_index=True, has_cls=False
            )
            offsets = kept_offsets(index, grid).to(device=kept.device, dtype=kept.dtype)
            out.append(torch.cat([kept, offsets], dim=1))
        return out

    # --- model step: positions of the kept tokens ----------------------------------------------------------------
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self.vtc_settings is None or not multimodal_embeddings:
            self._vtc_offsets = None
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        offsets = torch.cat([e[:, -OFFSET_CHANNELS:] for e in multimodal_embeddings])
        embeds = [e[:, :-OFFSET_CHANNELS] for e in multimodal_embeddings]
        self._vtc_offsets = (is_multimodal, offsets)
        return super().embed_input_ids(input_ids, embeds, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._vtc_offsets = self._vtc_offsets, None
        if pending is not None and inputs_embeds is not None:
            positions = add_offsets(positions, *pending)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VtcQwen2_5_VLForConditionalGeneration(_VtcQwenVL, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with vtc's pre-LLM selection (when the engine's hf_config has "vtc")."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtc_init(vllm_config.model_config.multimodal_config)


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class VtcQwen2VLForConditionalGeneration(_VtcQwenVL, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with vtc's pre-LLM selection (when the engine's hf_config has "vtc")."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtc_init(vllm_config.model_config.multimodal_config)
