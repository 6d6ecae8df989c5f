"""Visual-aware KV budget: separate budgets for the visual and the text entries of the cache.

vtc's own policy (no paper): a VLM's prompt is mostly image tokens whose relevance is decided by the
question, while generated text needs a sink + recent window. So:
- visual entries (which ones: the prefill Segment's `vis_index` of each layer) get `visual_budget` per
  sample and KV head, chosen once at prefill by SnapKV's observation-window votes (see `vtc.kv.snapkv`;
  the window is the prompt's last tokens, the question); they are never re-selected while decoding;
- text entries get the rest: the first `sinks` text entries (StreamingLLM's attention sinks, see
  `vtc.kv.streaming`) and the most recent ones, evicted at prefill and after every decode step.
A sample with fewer visual entries than `visual_budget` gives the difference to its text window, so a
text-only prompt behaves like `streaming`. Budget per sample and KV head = visual + text <= kv_budget.
"""

from __future__ import annotations

from .base import first_valid, register_policy, top_valid
from .snapkv import _ObservationWindow


@register_policy
class VisualAware(_ObservationWindow):
    name = "visual_aware"
    aliases = ("visual", "vision_aware")
    paper = "vtc (visual entries by SnapKV votes at prefill, text entries by StreamingLLM sinks + window)"

    def __init__(
        self,
        budget: int,
        visual_budget: int | None = None,
        sinks: int = 4,
        window: int = 32,
        kernel_size: int = 7,
        pooling: str = "avg",
    ):
        super().__init__(budget, window=window, kernel_size=kernel_size, pooling=pooling)
        visual_budget = budget // 2 if visual_budget is None else visual_budget
        if isinstance(visual_budget, bool) or not isinstance(visual_budget, int) or not 0 <= visual_budget < budget:
            raise ValueError(
                f"visual_aware: visual_budget must be an int in [0, kv_budget={budget}), got {visual_budget!r}"
            )
        if isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 <= sinks < budget - visual_budget:
            raise ValueError(
                f"visual_aware: sinks must be an int in [0, kv_budget - visual_budget = {budget - visual_budget}), "
                f"got {sinks!r}"
            )
        self.visual_budget, self.sinks = visual_budget, sinks

    def describe(self) -> str:
        return f"visual_aware(budget={self.budget}, visual={self.visual_budget}, sinks={self.sinks})"

    def keep_mask(self, layer, state, prefill):
        valid = self.valid(layer, state)
        visual = self.meta[layer]["visual"] & valid
        if prefill:
            kept_visual = top_valid(self.meta[layer]["score"], visual, self.visual_budget)
        else:
            kept_visual = visual  # chosen once at prefill
        text = valid & ~visual
        text_budget = self.budget - kept_visual.sum(-1, keepdim=True)  # (B, H, 1)
        sinks = first_valid(text, self.sinks)
        recent = text & (text.flip(-1).cumsum(-1).flip(-1) <= text_budget - sinks.sum(-1, keepdim=True))
        return kept_visual | sinks | recent
