"""One file per model family; importing this package registers them all."""

from . import causal_lm, internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401
from .base import Adapter, find_adapter, register_adapter, supported_models

__all__ = ["Adapter", "find_adapter", "register_adapter", "supported_models"]
