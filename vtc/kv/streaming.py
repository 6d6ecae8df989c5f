"""StreamingLLM: attention sinks + a recent window.

Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024, arXiv:2309.17453;
reference code: mit-han-lab/streaming-llm, `streaming_llm/kv_cache.py` (`StartRecentKVCache`: keep the first
`start_size` entries and the last `recent_size`). The budget is sinks + window; the same entries are kept for
every head, at prefill and after every decode step.

Differences from the reference, on purpose:
- Positions stay the original ones (the reference re-assigns positions inside the cache, "pos_shift");
  DESIGN.md keeps original RoPE positions, and keys are cached after RoPE.
- The reference evicts *before* a step (`evict_for_space`), so the new token sees window - 1 older entries;
  here eviction follows the step (see `vtc.kv.base`), so it sees the last `window` older entries.
"""

from __future__ import annotations

from .base import KVPolicy, first_valid, last_valid, register_policy


@register_policy
class StreamingLLM(KVPolicy):
    name = "streaming"
    aliases = ("streamingllm", "streaming_llm", "sink")
    paper = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 (arXiv:2309.17453)"

    def __init__(self, budget: int, sinks: int = 4):
        super().__init__(budget)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 <= sinks < budget:
            raise ValueError(f"streaming: sinks must be an int in [0, kv_budget={budget}), got {sinks!r}")
        self.sinks = sinks
        self.window = budget - sinks

    def describe(self) -> str:
        return f"streaming(budget={self.budget}, sinks={self.sinks}, window={self.window})"

    def keep_mask(self, layer, state, prefill):
        valid = self.valid(layer, state)
        return first_valid(valid, self.sinks) | last_valid(valid, self.window)
