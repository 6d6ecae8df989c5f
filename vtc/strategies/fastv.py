"""FastV: drop visual tokens inside the LLM by the attention the last prompt token pays them.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024 (github.com/pkunlp-icler/FastV).

As in the official in-place implementation: at decoder layer K (default 2) the visual tokens are ranked by
the attention the last prompt token gives them inside layer K-1, averaged over heads (softmax over the
whole causal row); round(N * keep) are kept per image (paper default R = 50%, keep = 0.5), in their
original order and with their original position ids; layers K.. run on the shorter sequence and cache it.
Text tokens are never dropped. `queries="text"` averages the rows of all text tokens instead (the paper's
wording, "attention received from all other tokens"; the official code uses the last token).

Budget rounding: round(N * keep) is rounded half up (vtc's `tokens_to_keep`). The official repository has
three implementations that disagree: the HF-transformers one (src/FastV/llava-hf/.../llama/modeling_llama.py,
`topk(round(FASTV_image_token_length * (1 - FASTV_r)))`) rounds like us except at exact halves (Python's
`round` goes to even: N = 36, keep 0.125 -> 4 there, 5 here); the lmms-eval one (src/FastV/lmms-eval/
fastv_kvcache.py, `topk(int(576 * ratio))`) truncates (keep 0.1: 57 of 576 there, 58 here); the LLaVA one
takes an absolute count (`fast_v_attention_rank`). Pass an int `keep` for an exact count.
"""

from __future__ import annotations

import torch

from .base import Strategy, VisualTokens, register_strategy


@register_strategy
class FastV(Strategy):
    name = "fastv"
    aliases = ("fast_v",)
    stage = "llm"
    paper = "Chen et al., ECCV 2024, arXiv:2403.06764"
    default_keep = 0.5

    def __init__(self, keep: float | int = 0.5, layer: int = 2, queries: str = "last"):
        super().__init__(keep)
        if queries not in ("last", "text"):
            raise ValueError("queries must be 'last' (official code) or 'text' (mean over text tokens)")
        self.llm_layer = int(layer)
        self.text_queries = queries

    def describe(self) -> str:
        return f"fastv(K={self.llm_layer}, keep={self.keep}, queries={self.text_queries})"

    def score(self, visual: VisualTokens) -> torch.Tensor:
        return visual.text_attention.mean(dim=1)
