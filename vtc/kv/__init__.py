"""Decode-time KV-cache policies, shared by VLMs and text-only LLMs (DESIGN.md, section 3, stage 4).

    vtc.patch(model, strategy="fastv", keep=0.25, kv="snapkv", kv_budget=256)
    vtc.patch(llama, kv="streaming", kv_budget=512)            # a plain LlamaForCausalLM
    vtc.patch(model, kv="visual_aware", kv_budget=128, kv_options={"visual_budget": 32})

One file per policy; importing this package registers them all.
"""

from . import dycoke, h2o, snapkv, streaming, visual_aware  # noqa: F401
from .base import KVPolicy, KVReport, build_policy, get_policy_class, list_policies, register_policy
from .dycoke import DyCokeKV
from .h2o import H2O
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .visual_aware import VisualAware

__all__ = [
    "DyCokeKV",
    "H2O",
    "KVPolicy",
    "KVReport",
    "SnapKV",
    "StreamingLLM",
    "VisualAware",
    "build_policy",
    "get_policy_class",
    "list_policies",
    "register_policy",
]
