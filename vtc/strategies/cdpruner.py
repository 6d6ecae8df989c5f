"""CDPruner: keep the visual tokens of maximal conditional diversity (a DPP conditioned on the instruction).

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
NeurIPS 2025, arXiv:2506.10967 (github.com/Theia-4869/CDPruner). As in the official code
(llava/model/llava_arch.py `encode_images`):

- similarity: cosine between the projected visual features (after the projector), S (N, N);
- relevance: the mean over the instruction's embeddings of MINUS the cosine between each visual token's
  embedding and the text embedding (`(-relevance).mean(dim=-1)`), min-max normalised to [~0, 1]
  (`(r - r.min() + 1e-6) / (r.max() - r.min())`);
- kernel L = diag(r) S diag(r); the greedy MAP of the DPP by the fast Cholesky update of Chen et al. (2018):
  pick argmax of the residual diagonal d_i^2, e_i = (L[j] - c_j . C) / sqrt(d_j^2), d^2 -= e^2, the picked one
  set to -inf; T picks, batched over images; kept tokens return to raster order at their original positions.

The instruction embedding, and what is ours: the official code embeds the instruction text with CLIP's TEXT
tower (`CLIPTextModelWithProjection`, 77-token segments) and the visual tokens with CLIP's `post_layernorm` +
`visual_projection`, a shared space. An HF VLM carries neither (LLaVA loads `CLIPVisionModel` only; Qwen-VL
and InternVL have no CLIP at all), so we use the nearest space the model itself shares between the two: the
LLM's input space. The visual embeddings are the projected visual tokens, the text embeddings the input
embeddings of the sample's text tokens after the image's last token (the question and the template's closing
words; every text token of the sample when none follows the image). The sign and the normalisation are the
official ones. The min-max runs per image (the official code runs it over one `encode_images` call: one image
on LLaVA-1.5, the crops of one image on LLaVA-NeXT). Ties go to the lowest index (`argmax`, as the official).
Default keep 128/576 (the README's first example; the official scripts take the count as an argument). Needs no
probe: every adapter runs it.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(I, k) greedy MAP picks of DPPs with kernels (I, N, N), in pick order (fast Cholesky-style update)."""
    i, n, _ = kernel.shape
    rows = torch.arange(i, device=kernel.device)
    cis = kernel.new_zeros(k, i, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = torch.empty(k, i, dtype=torch.long, device=kernel.device)
    for t in range(k):
        j = di2s.argmax(dim=1)
        picks[t] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:t, rows, j], cis[:t])) / di2s[rows, j].sqrt()[:, None]
        cis[t] = eis
        di2s = di2s - eis.square()
        di2s[rows, j] = float("-inf")
    return picks.t()


def instruction_relevance(visual_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor):
    """(I, N) CDPruner's relevance: mean over each image's text tokens of -cos, min-max normalised per image.

    visual_embeds (I, N, D), text_embeds (I, L, D), text_mask (I, L) bool (at least one True per row)."""
    cos = ops.pairwise_cosine(visual_embeds, text_embeds)  # (I, N, L)
    weights = text_mask.float() / text_mask.sum(dim=1, keepdim=True)
    relevance = -(cos * weights[:, None]).sum(dim=2)
    low, high = relevance.min(dim=1, keepdim=True).values, relevance.max(dim=1, keepdim=True).values
    return (relevance - low + 1e-6) / (high - low)


@register_strategy
class CDPruner(Strategy):
    name = "cdpruner"
    aliases = ("cd_pruner",)
    stage = "pre_llm"
    paper = "Zhang et al., NeurIPS 2025, arXiv:2506.10967"
    default_keep = 128 / 576

    def __init__(self, keep: float | int = 128 / 576):
        super().__init__(keep)

    def describe(self) -> str:
        return f"cdpruner(keep={self.keep})"

    def text_rows(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: the flat rows (I, L) of its sample's instruction tokens and their mask (I, L)."""
        seq, rows, samples = visual.context["sequence"], visual.context["rows"], visual.context["sample"]
        b, length = seq.valid.shape
        is_text = ((seq.vis_index < 0) & seq.valid)[samples]  # (I, L)
        position = torch.arange(length, device=rows.device)
        after = is_text & (position[None] > (rows % length).max(dim=1, keepdim=True).values)
        mask = torch.where(after.any(dim=1, keepdim=True), after, is_text)
        return samples[:, None] * length + position[None], mask

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        features = visual.features
        if k >= n:
            return torch.arange(n, device=features.device).expand(visual.num_images, -1)
        flat_rows, mask = self.text_rows(visual)
        hidden = visual.context["sequence"].hidden
        text = hidden.reshape(-1, hidden.shape[-1])[flat_rows]  # (I, L, D)
        relevance = instruction_relevance(features, text, mask)
        kernel = relevance[:, :, None] * ops.pairwise_cosine(features) * relevance[:, None, :]
        return dpp_greedy_map(kernel, k).sort(dim=1).values
