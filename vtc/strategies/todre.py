"""ToDRE: a diverse subset of visual tokens before the LLM, then task-aware pruning inside it.

Li, Yang, Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large
Vision-Language Models", arXiv:2505.18757 (v2: "Effective Visual Token Pruning via Token Diversity and
Task Relevance"). Headline claim: 90% of the visual tokens removed after the vision encoder and all of them
in later decoder layers, a 2.6x total inference speed-up, 95% of the model's performance kept.

No official code was found; these choices are ours and documented as such:

Stage 1 (pre-LLM, "token diversity"): keep round(N * keep) tokens per image (default keep = 0.1, the
paper's 90% reduction), chosen greedily on the projected features with cosine distance 1 - cos:
- `diversity="kcenter"` (v1 of the paper): greedy k-center / farthest-point sampling (`vtc.ops.kcenter`):
  each step adds the token farthest from its nearest kept token.
- `diversity="maxsum"` (v2: greedy max-sum diversification): each step adds the token with the largest
  SUM of distances to the tokens kept so far (ties -> lowest index).
Both are seeded with the token the vision tower's [CLS] attends to most at the feature layer (summed over
heads). Kept tokens keep their raster order and original positions.

Stage 2 (inside the LLM, "task relevance" and "information migration"):
- before decoder layer `task_layer` (default round(L / 2)), keep round(n * task_keep) of the surviving
  visual tokens (default task_keep = 0.5), those the text tokens attend to most at the layer before
  (mean over the text queries' rows and heads, `queries="text"`; `"last"`: last prompt token only);
- before decoder layer `drop_layer` (default round(3 L / 4)), drop ALL visual tokens: by then their
  information has migrated into the text tokens. Layers from there on run on text only.
With the 32-layer LLaVA-1.5-7B decoder the defaults are layers 16 and 24. `stage2=False` keeps stage 1 only.
The report shows the realised counts per layer. The float `keep` is stage 1's fraction; an int keep is
stage 1's token count per image.
"""

from __future__ import annotations

import torch

from .. import ops
from ..budget import tokens_to_keep
from ..probes import decoder_attention_rows
from .base import Strategy, VisualTokens, register_strategy, top_k_sorted


def max_sum_diversify(x: torch.Tensor, k: int, first: torch.Tensor) -> torch.Tensor:
    """Greedy max-sum diversification with cosine distance: (I, N, D) -> (I, k) indices in pick order.

    Step 0 picks `first` (I,); each further step picks the unpicked token j maximising
    sum over picked s of (1 - cos(x_j, x_s)); ties -> lowest index."""
    images, n, _ = x.shape
    out = torch.empty(images, k, dtype=torch.long, device=x.device)
    if k == 0:
        return out
    distance = 1.0 - ops.pairwise_cosine(x)  # (I, N, N)
    rows = torch.arange(images, device=x.device)
    total = torch.zeros(images, n, device=x.device)
    picked = torch.zeros(images, n, dtype=torch.bool, device=x.device)
    pick = first.to(x.device)
    for step in range(k):
        out[:, step] = pick
        picked[rows, pick] = True
        total += distance[rows, pick]
        pick = total.masked_fill(picked, float("-inf")).argmax(dim=1)
    return out


@register_strategy
class ToDRE(Strategy):
    name = "todre"
    stage = "pre_llm"
    paper = "Li et al., arXiv:2505.18757"
    default_keep = 0.1
    needs_keys = True  # the in-LLM probe then also carries the input of the layer before each stage

    def __init__(
        self,
        keep: float | int = 0.1,
        diversity: str = "kcenter",
        task_layer: int | None = None,
        task_keep: float = 0.5,
        drop_layer: int | None = None,
        queries: str = "text",
        stage2: bool = True,
    ):
        super().__init__(keep)
        if diversity not in ("kcenter", "maxsum"):
            raise ValueError("diversity must be 'kcenter' (greedy k-center) or 'maxsum' (greedy max-sum)")
        if queries not in ("last", "text"):
            raise ValueError("queries must be 'text' (mean over text tokens) or 'last' (last prompt token)")
        if not 0.0 <= float(task_keep) <= 1.0:
            raise ValueError(f"task_keep={task_keep}: pass the fraction of visual tokens kept at task_layer, in [0, 1]")
        self.diversity = diversity
        self.task_layer, self.drop_layer = task_layer, drop_layer
        self.task_keep = float(task_keep)
        self.text_queries = queries
        self.stage2 = bool(stage2)
        self._layers: tuple[int, int] = (-1, -1)

    # --- layers ---------------------------------------------------------------------------------
    def stage2_layers(self, num_layers: int) -> tuple[int, int]:
        task = self.task_layer if self.task_layer is not None else max(1, round(num_layers / 2))
        drop = self.drop_layer if self.drop_layer is not None else max(task + 1, round(3 * num_layers / 4))
        if not 1 <= task < drop < num_layers:
            raise ValueError(
                f"todre needs 1 <= task_layer < drop_layer < {num_layers} (the decoder's layers), got "
                f"task_layer={task}, drop_layer={drop}: pass task_layer/drop_layer, or stage2=False"
            )
        return task, drop

    def prune_layers(self, num_layers: int) -> list[int]:
        if not self.stage2:
            return []
        self._layers = self.stage2_layers(num_layers)  # the decoder asks before any in-LLM stage_budget
        return list(self._layers)

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls": [feature_layer]}

    def describe(self) -> str:
        stage2 = f", task_keep={self.task_keep}, layers={self.task_layer or 'L/2'}/{self.drop_layer or '3L/4'}"
        return f"todre(keep={self.keep}, diversity={self.diversity}{stage2 if self.stage2 else ', stage 1 only'})"

    # --- selection ------------------------------------------------------------------------------
    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        if stage == "pre_llm":
            return super().stage_budget(n_original, n_alive, stage)
        if stage == self._layers[1]:
            return 0  # information migration: every visual token goes
        return tokens_to_keep(self.task_keep, n_alive) if self.task_keep > 0 else 0

    def relevance(self, visual: VisualTokens) -> torch.Tensor:
        """(I, n) text-to-visual attention at the layer before this stage, mean over heads and text queries.

        `queries="text"` recomputes the rows from the layer's input (`needs_keys` asks the loop for it): the
        loop's own mean over text rows turns NaN when a left-padding query has no valid key (reported)."""
        if self.text_queries == "last":
            return visual.text_attention.mean(dim=1)
        context = visual.context
        seq, lm, hidden = context["sequence"], context["lm"], context["probe"]["hidden_in"]
        b, length = seq.valid.shape
        layer = lm.layers[visual.stage - 1]
        query = torch.arange(length, device=hidden.device).expand(b, -1)
        rows = decoder_attention_rows(layer, hidden, lm.rotary_emb(hidden, seq.positions), query, seq.valid)
        is_text = ((seq.vis_index < 0) & seq.valid).float()
        weight = is_text / is_text.sum(dim=1, keepdim=True).clamp(min=1)
        per_key = (rows.nan_to_num(0.0) * weight[..., None]).sum(dim=1)  # (B, L)
        return per_key.reshape(-1)[context["rows"]]

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        if k == 0:
            return torch.empty(visual.num_images, 0, dtype=torch.long, device=device)
        if visual.stage != "pre_llm":  # task relevance: text-to-visual attention at the layer before
            return top_k_sorted(self.relevance(visual), k)
        (cls,) = visual.cls_attention.values()
        first = cls.sum(dim=1).argmax(dim=1)  # most [CLS]-attended token (first on ties)
        if self.diversity == "kcenter":
            picked = ops.kcenter(visual.features, k, first=first)
        else:
            picked = max_sum_diversify(visual.features, k, first)
        return picked.sort(dim=1).values
