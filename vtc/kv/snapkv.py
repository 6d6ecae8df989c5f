"""SnapKV: the prompt's last tokens vote for the entries to keep, per KV head; prefill only.

Li et al., *SnapKV: LLM Knows What You are Looking for Before Generation*, NeurIPS 2024, arXiv:2404.14469;
reference code: FasterDecoding/SnapKV, `snapkv/monkeypatch/snapkv_utils.py` (`SnapKVCluster.update_kv`):
the last `window_size` prompt tokens (the observation window) attend to the prefix; their attention
probabilities (softmax over the whole causal row) are summed over the window's queries, smoothed along the
prefix with a 1-D pooling (`kernel_size`, stride 1, padding kernel // 2, average or max), and each head keeps
the top `max_capacity_prompt - window_size` prefix entries plus the whole window. Generated tokens are
appended without further eviction, so the cache is budget + generated tokens while decoding.

Defaults follow the paper's LongBench setting: window 32, kernel 7, average pooling (the reference code's
defaults are 32/5/avg). The window shrinks to budget // 2 when the budget is not larger than it (the
reference asserts budget > window) and never exceeds the prompt. With GQA the query heads of a KV head's
group are averaged (as kvpress does; FasterDecoding/SnapKV issue 22). A sample whose prompt fits the budget
keeps everything (the reference skips compression when the prompt is shorter than the budget).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..probes import project_qk
from .base import KVPolicy, attention_per_kv_head, last_valid, prefill_allowed, register_policy, top_valid

POOLING = ("avg", "max")


def observation_votes(q, k, valid, window: int, scaling: float, kernel_size: int, pooling: str) -> torch.Tensor:
    """(B, kv_heads, L - window) pooled votes of the last `window` queries for the prefix entries.

    q (B, heads, L, d) and k (B, kv_heads, L, d) with RoPE applied, valid (B, L)."""
    b, length = valid.shape
    query_index = torch.arange(length - window, length, device=valid.device).expand(b, -1)
    allowed = prefill_allowed(valid, query_index)
    votes = attention_per_kv_head(q[:, :, length - window :], k, allowed, scaling)[..., : length - window]
    if kernel_size > 1 and votes.shape[-1] > 0:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        votes = pool(votes, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    return votes


class _ObservationWindow(KVPolicy):
    """Shared by SnapKV and the visual-aware policy: observation-window votes per KV head at prefill."""

    per_head = True
    needs_prefill_scores = True

    def __init__(self, budget: int, window: int = 32, kernel_size: int = 7, pooling: str = "avg"):
        super().__init__(budget)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{self.name}: window must be a positive int, got {window!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or not kernel_size % 2:
            raise ValueError(f"{self.name}: kernel_size must be a positive odd int, got {kernel_size!r}")
        if pooling not in POOLING:
            raise ValueError(f"{self.name}: pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
        self.window = window if window < budget else max(1, budget // 2)
        self.kernel_size, self.pooling = kernel_size, pooling

    def observation_window(self, length: int) -> int:
        return min(self.window, length)

    def score_prefill(self, i, layer, hidden, position_embeddings, valid):
        q, k = project_qk(layer, hidden, position_embeddings)
        w = self.observation_window(valid.shape[1])
        votes = observation_votes(q, k, valid, w, layer.self_attn.scaling, self.kernel_size, self.pooling)
        window = torch.full((*votes.shape[:2], w), float("inf"), device=votes.device)
        return torch.cat([votes, window], dim=-1)  # the window itself always stays


@register_policy
class SnapKV(_ObservationWindow):
    name = "snapkv"
    aliases = ("snap_kv",)
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024 (arXiv:2404.14469)"
    evict_at_decode = False

    def describe(self) -> str:
        return (
            f"snapkv(budget={self.budget}, window={self.window}, kernel={self.kernel_size}, "
            f"pooling={self.pooling}; prefill only)"
        )

    def keep_mask(self, layer, state, prefill):
        valid = self.valid(layer, state)
        w = min(self.window, valid.shape[-1])
        window = last_valid(valid, w)
        return window | top_valid(self.meta[layer]["score"], valid & ~window, self.budget - w)
