"""IDPruner: importance and diversity by maximal marginal relevance (MMR) over the projected visual tokens.

Tencent AngelSlim's token compressor, `angelslim/compressor/token_compressor/algorithm/idpruner.py` (with
`utils/vision_selector_utils.py`), configs `configs/*/pruning/idpruner_r0.75.yaml` (github.com/Tencent/AngelSlim).
Attention-map free: it reads only the visual tokens as they enter the LLM.

As in that code, per image with budget k = round(N * keep): importance = the selector's raw scores min-max
normalised to [0, 1] ((s - min) / (max - min + 1e-6)); similarity = cosine of the tokens; the first pick is the most
important token, every later step picks argmax of  lambda * importance - (1 - lambda) * (max similarity to a picked
token)  among the unpicked (`mmr_lambda` 0.5, `parallel_k` 1: one token per step). Kept tokens keep raster order.

The importance comes from AngelSlim's trained "Vision Selector" (e.g. the hub checkpoints
AngelSlim/Qwen2.5-VL-7B-Instruct-Selector, loaded there by executing the checkpoint's own Python file). vtc does not
download or execute it: pass `selector=`, any callable (e.g. that module, loaded yourself) mapping the visual tokens
(I, N, D) to raw scores (I, N) or (I, N, 1). Without a selector vtc warns at patch() and the report says so: every
token then has the same importance, and the selection is the MMR diversity term alone (greedy max-min cosine
diversity from the first token), which is not IDPruner's accuracy.

Where we differ, and why: each image (crop, frame) has its own budget (AngelSlim selects over all of a sample's
visual tokens at once); ties pick the lowest index (`torch.topk` leaves them unspecified); `parallel_k` > 1 picks the
top parallel_k by MMR per step, as AngelSlim does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy


def mmr_select(features: torch.Tensor, raw_scores: torch.Tensor, k: int, mmr_lambda: float, parallel_k: int = 1):
    """(I, k) indices in pick order: AngelSlim's MMR greedy loop, batched over images."""
    low, high = raw_scores.min(dim=1, keepdim=True).values, raw_scores.max(dim=1, keepdim=True).values
    importance = ((raw_scores - low) / (high - low + 1e-6)).float()
    similarity = ops.pairwise_cosine(features.float())
    images, n = importance.shape
    rows = torch.arange(images, device=features.device)[:, None]
    candidate = torch.ones(images, n, dtype=torch.bool, device=features.device)
    max_similarity = torch.full((images, n), -2.0, device=features.device)
    out, picked = torch.empty(images, k, dtype=torch.long, device=features.device), 0
    while picked < k:
        step = min(parallel_k, k - picked)
        score = importance.clone() if picked == 0 else mmr_lambda * importance - (1 - mmr_lambda) * max_similarity
        score = score.masked_fill(~candidate, float("-inf"))
        best = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :step]
        out[:, picked : picked + step] = best
        candidate[rows, best] = False
        columns = similarity.gather(2, best[:, None, :].expand(-1, n, -1))  # (I, N, step)
        max_similarity = torch.maximum(max_similarity, columns.amax(dim=2))
        picked += step
    return out


@register_strategy
class IDPruner(Strategy):
    name = "idpruner"
    stage = "pre_llm"
    paper = "Tencent AngelSlim token compressor (idpruner)"
    default_keep = 0.25

    def __init__(
        self,
        keep: float | int = 0.25,
        selector: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mmr_lambda: float = 0.5,
        parallel_k: int = 1,
    ):
        super().__init__(keep)
        if not 0.0 <= float(mmr_lambda) <= 1.0:
            raise ValueError(f"mmr_lambda={mmr_lambda}: pass the importance weight of MMR, in [0, 1]")
        if int(parallel_k) < 1:
            raise ValueError(f"parallel_k={parallel_k}: pass the tokens picked per greedy step, >= 1")
        if selector is not None and not callable(selector):
            raise TypeError("selector must be a callable (e.g. a torch module): visual tokens (I, N, D) -> scores")
        self.selector, self.mmr_lambda, self.parallel_k = selector, float(mmr_lambda), int(parallel_k)
        self.notes: list[str] = []

    def check_adapter(self, adapter) -> None:
        if self.selector is None and not self.notes:
            message = (
                "idpruner without selector=: no trained Vision Selector, so every token has the same importance and "
                "the selection is MMR's diversity term alone; pass selector= (a callable (I, N, D) -> (I, N)) for "
                "IDPruner proper"
            )
            warnings.warn(message, UserWarning, stacklevel=5)
            self.notes.append(message)

    def describe(self) -> str:
        selector = "selector" if self.selector is not None else "no selector: diversity only"
        return f"idpruner(keep={self.keep:.3g}, lambda={self.mmr_lambda}, {selector})"

    def importance(self, features: torch.Tensor) -> torch.Tensor:
        if self.selector is None:
            return torch.zeros(features.shape[:2], device=features.device)
        with torch.no_grad():
            scores = self.selector(features)
        scores = scores.squeeze(-1) if scores.dim() == 3 else scores
        if scores.shape != features.shape[:2]:
            expected = tuple(features.shape[:2])
            raise ValueError(f"the selector returned {tuple(scores.shape)}; it must return (I, N) = {expected}")
        return scores.float()

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        picked = mmr_select(visual.features, self.importance(visual.features), k, self.mmr_lambda, self.parallel_k)
        return picked.sort(dim=1).values
