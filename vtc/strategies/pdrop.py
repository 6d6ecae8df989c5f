"""PyramidDrop: drop visual tokens at the end of several LLM stages, a fixed ratio lambda each time.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction", CVPR 2025, arXiv:2410.17247 (github.com/Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py`:
`pdrop_forward`, `pdrop_rank_drop`; the same algorithm in ModelTC/LightCompress
`llmc/compression/token_reduction/pyramiddrop.py`).

As in the official code: the decoder is split into stages at `layer_list` (official default [8, 16, 24] for the
32-layer LLaVA-1.5-7B decoder, with `image_token_ratio_list` [0.5, 0.25, 0.125], i.e. lambda = 0.5). Before
stage layer l_s, the hidden states entering layer l_s are normed with that layer's input_layernorm and projected
with ITS q/k (RoPE applied); the last instruction token (the last prompt token) queries every key under the causal
mask, the softmax is averaged over heads, and the visual tokens it attends to most are kept: int(N * lambda^s) of
the image's N visual tokens (truncated, as the official `int(...)`), in their original order.

`keep` is lambda (default 0.5, the official setting); stage s keeps int(N * keep^s). An int keep is the count
kept at the first stage (lambda = keep / N). `layers` overrides the stage layers; the default scales the
official [8, 16, 24] of 32 layers to the model's depth L: round(L/4), round(L/2), round(3L/4).

Where we differ from the official code, and why:
- Kept tokens keep their original position ids (vtc's invariant); the official code renumbers the compacted
  sequence 0..n-1 after each drop (and shifts the decode positions accordingly).
- Batched over images with left padding; the official inference path handles one image per sample, right padding.
- The attention row is computed in fp32 from q/k (SDPA stays on); the official code computes it in the model dtype.
- Ties in the top-k go to the lower index (`top_k_sorted`); `torch.topk` leaves them unspecified.
- Composed after a pre-LLM strategy, N is still the image's token count before that strategy, capped by the
  tokens still alive.
"""

from __future__ import annotations

import numbers

import torch

from ..probes import decoder_attention_rows
from .base import Strategy, VisualTokens, register_strategy, top_k_sorted


def last_token_attention(visual: VisualTokens) -> torch.Tensor:
    """(I, n) attention of each sample's last prompt token to the image's visual tokens at decoder layer
    `visual.stage`, from that layer's q/k on its input (the official PyramidDrop / SparseVLM convention of ranking
    with the attention of the layer the tokens are about to enter), mean over heads."""
    context = visual.context
    seq, lm = context["sequence"], context["lm"]
    b, length = seq.valid.shape
    layer = lm.layers[visual.stage]
    query = torch.full((b, 1), length - 1, dtype=torch.long, device=seq.hidden.device)
    rows = decoder_attention_rows(layer, seq.hidden, lm.rotary_emb(seq.hidden, seq.positions), query, seq.valid)
    return rows[:, 0].reshape(-1)[context["rows"]]


@register_strategy
class PyramidDrop(Strategy):
    name = "pdrop"
    aliases = ("pyramiddrop", "pyramid_drop")
    stage = "llm"
    paper = "Xing et al., CVPR 2025, arXiv:2410.17247"
    default_keep = 0.5

    def __init__(self, keep: float | int = 0.5, layers: list[int] | tuple[int, ...] | None = None):
        super().__init__(keep)
        if layers is not None:
            layers = [int(x) for x in layers]
            if not layers or sorted(set(layers)) != layers:
                raise ValueError(f"layers={layers}: pass strictly increasing decoder layer indices, e.g. [8, 16, 24]")
        self.layers = layers
        self._stages: list[int] = []

    def prune_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            self._stages = list(self.layers)
        else:
            self._stages = sorted({max(1, round(num_layers * s / 4)) for s in (1, 2, 3)})
        return list(self._stages)

    def describe(self) -> str:
        return f"pdrop(lambda={self.keep}, layers={self.layers or 'L/4, L/2, 3L/4'})"

    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        s = self._stages.index(stage) + 1
        if isinstance(self.keep, numbers.Integral):
            count = int(n_original * (self.keep / n_original) ** s + 1e-9) if n_original else 0
        else:
            count = int(n_original * float(self.keep) ** s)
        return min(count, n_alive)

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        return top_k_sorted(last_token_attention(visual), k)
