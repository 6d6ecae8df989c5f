"""H2O: heavy hitters (accumulated attention) + a recent window, per KV head.

Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*,
NeurIPS 2023, arXiv:2306.14048; reference code: FMInference/H2O, `h2o_hf/utils_real_drop/modify_llama.py`
(`H2OKVCache_LayerWise`): every entry's score is the attention probability it received, summed over all
queries so far (the prompt's rows at prefill, then each generated token's row), per head; after every forward
the cache keeps the last `recent_size` entries plus the `hh_size` highest-scoring older ones, per head.
Scores of kept entries keep accumulating; evicted entries never come back.

Here: budget = heavy + window, window = budget // 2 by default (the paper's runs use equal heavy and recent
ratios). Scores are recomputed from q and k of each layer (never `output_attentions`); with GQA the query
heads of a KV head's group are averaged. The prompt's scores cost one extra attention pass at prefill, in
chunks of query rows.
"""

from __future__ import annotations

from ..probes import project_qk
from .base import (
    KVPolicy,
    attention_per_kv_head,
    decode_scores,
    last_valid,
    prefill_allowed,
    register_policy,
    top_valid,
)


@register_policy
class H2O(KVPolicy):
    name = "h2o"
    aliases = ("heavy_hitter", "heavy_hitters")
    paper = "Zhang et al., H2O: Heavy-Hitter Oracle, NeurIPS 2023 (arXiv:2306.14048)"
    per_head = True
    needs_prefill_scores = True
    needs_decode_scores = True

    def __init__(self, budget: int, window: int | None = None):
        super().__init__(budget)
        window = budget // 2 if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= budget:
            raise ValueError(f"h2o: window must be an int in [0, kv_budget={budget}], got {window!r}")
        self.window = window
        self.heavy = budget - window

    def describe(self) -> str:
        return f"h2o(budget={self.budget}, heavy={self.heavy}, window={self.window})"

    def score_prefill(self, i, layer, hidden, position_embeddings, valid):
        import torch

        q, k = project_qk(layer, hidden, position_embeddings)
        b, length = valid.shape
        query_index = torch.arange(length, device=valid.device).expand(b, -1)
        allowed = prefill_allowed(valid, query_index)
        return attention_per_kv_head(q, k, allowed, layer.self_attn.scaling, query_weight=valid.float())

    def score_decode(self, i, layer, hidden, position_embeddings, state):
        return decode_scores(layer, hidden, position_embeddings, state, i)

    def keep_mask(self, layer, state, prefill):
        valid = self.valid(layer, state)
        recent = last_valid(valid, self.window)
        heavy = top_valid(self.meta[layer]["score"], valid & ~recent, self.heavy)
        return recent | heavy
