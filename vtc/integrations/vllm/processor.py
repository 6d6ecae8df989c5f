"""What every vtc model class in vLLM shares: the engine's settings, the per-image fields that carry a request's
strategy and keep from the processor to `embed_multimodal`, and the processor mix-in that adds them."""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from . import KEEP_KWARG, SERVED, STRATEGY_KWARG, make_strategy, request_settings

# Per image, from the processor to embed_multimodal: the request's strategy (index into SERVED) and its keep
# (a fraction as itself, a token count k as -k).
STRATEGY_FIELD, KEEP_FIELD = "vtc_strategy", "vtc_keep"


def engine_settings(hf_config) -> dict | None:
    """The engine's "vtc" settings from hf_overrides, or None (the model is then vLLM's own)."""
    return getattr(hf_config, "vtc", None)


def encode_keep(keep: float | int) -> float:
    return -float(keep) if isinstance(keep, int) else float(keep)


def decode_keep(value: float) -> float | int:
    return int(-value) if value < 0 else float(value)


def image_settings(engine: dict, strategy_ids, keeps) -> list[dict]:
    """Per image, the settings its request asked for (decoded from the two per-image fields)."""
    return [
        request_settings(engine, {STRATEGY_KWARG: SERVED[int(i)], KEEP_KWARG: decode_keep(float(k))})
        for i, k in zip(torch.as_tensor(strategy_ids).flatten(), torch.as_tensor(keeps).flatten())
    ]


def wanted_probes(per_image: list[dict], vision_layers: tuple[int, int]) -> dict[str, set[int]]:
    """kind -> vision layers: the probe rows that the images' strategies read."""
    wanted: dict[str, set[int]] = {}
    for settings in {json.dumps(s, sort_keys=True) for s in per_image}:
        for kind, layers in make_strategy(json.loads(settings)).vision_probes(*vision_layers).items():
            wanted.setdefault(kind, set()).update(layers)
    return wanted


class VtcProcessorMixin:
    """Put before a vLLM multimodal processor class: strips vtc's request kwargs before the HF processor, and hands
    each image its request's strategy and keep (batched per-image fields). The placeholder count per image is the
    model's own `_get_prompt_updates` (it knows the image's token count)."""

    def _settings(self, hf_kwargs) -> dict | None:
        settings = engine_settings(self.info.get_hf_config())
        return request_settings(settings, hf_kwargs) if settings is not None else None

    def _call_hf_processor(self, hf_data, hf_kwargs, *args, **kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in (KEEP_KWARG, STRATEGY_KWARG)}  # vtc's own
        return super()._call_hf_processor(hf_data, hf_kwargs, *args, **kwargs)

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        settings = self._settings(hf_processor_mm_kwargs)
        grids, pixels = processed_data.get("image_grid_thw"), processed_data.get("pixel_values")
        n = len(grids) if grids is not None else len(pixels) if pixels is not None else 0
        if settings is not None and n:
            strategy = make_strategy(settings)
            processed_data[STRATEGY_FIELD] = torch.full((n,), SERVED.index(strategy.name), dtype=torch.long)
            processed_data[KEEP_FIELD] = torch.full((n,), encode_keep(strategy.keep), dtype=torch.float64)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping:
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if engine_settings(self.info.get_hf_config()) is not None:
            fields[STRATEGY_FIELD] = MultiModalFieldConfig.batched("image")
            fields[KEEP_FIELD] = MultiModalFieldConfig.batched("image")
        return fields
