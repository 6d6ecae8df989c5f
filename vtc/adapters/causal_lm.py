"""Plain text-only causal LMs (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`): no vision tower,
no visual tokens. Only decode-time KV policies apply (`vtc.patch(llm, kv="streaming", kv_budget=512)`); the
decoder loop runs with the policy's hooks, every token being text."""

from __future__ import annotations

import torch

from .base import Adapter, register_adapter
from .decoder import VisualLayout


@register_adapter
class CausalLMAdapter(Adapter):
    name = "causal_lm"
    model_classes = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model  # the LlamaModel / Qwen2Model / MistralModel

    def num_vision_layers(self) -> int:
        return 0

    def feature_layer(self) -> int:
        return 0

    def check(self, strategy) -> None:
        if strategy.name != "none":
            raise ValueError(
                f"{type(self.model).__name__} is a text-only language model: visual-token strategy "
                f"{strategy.name!r} has nothing to prune; pass strategy=None with a KV policy, "
                f"e.g. vtc.patch(model, kv='streaming', kv_budget=512)"
            )
        super().check(strategy)

    def install_capture(self, handle) -> None:
        """Nothing to capture: no token is visual (`take_visual_mask` stays None)."""

    def visual_layout(self, visual: torch.Tensor, n_visual: int) -> VisualLayout:
        raise RuntimeError(f"{type(self.model).__name__} has no visual tokens")
