"""ToMe: token merging by bipartite soft matching, once before the LLM (default) or in every ViT layer.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (github.com/facebookresearch/ToMe). The
matching rule is the official `bipartite_soft_matching` (tome/merge.py): tokens alternate into sets A
(even) and B (odd); each A token finds its most cosine-similar B token; the r A tokens with the best
matches are merged into their B token by a size-weighted average (`merge_wavg`), sizes add up. The metric
is the attention keys averaged over heads (tome/patch/timm.py, `ToMeAttention.forward` returns
`k.mean(1)`). We call `vtc.ops.bipartite_merge`, which keeps the surviving tokens in their original order.

The paper merges r tokens in every ViT block. The default placement, `placement="pre_llm"`, is one pre-LLM
step to a token budget instead (our choice, so that it composes with the other strategies and works on every
adapter with a keys probe; the vision tower is untouched):

- Repeated rounds of bipartite merging until k tokens remain: each round removes r = min(n - k, ceil(n / 2))
  tokens (as many as the A set allows), so 576 -> 64 takes 4 rounds.
- Metric (`metric="keys"`, default): the keys of the vision encoder's feature layer (the layer whose output
  feeds the projector), averaged over heads, as ToMe uses the current block's keys. Between rounds there is
  no next block to recompute keys from, so the metric is merged along with the features (size-weighted
  average). `metric="features"` matches on the projected features instead.
- Merged features: size-weighted averages of the projected features (the tokens entering the LLM).
- Positions: a merged token sits at its representative, the B token that survived (recursively), so the
  output keeps raster order and original position ids. ToMe's proportional attention (log size added to
  the attention logits) is not applied inside the LLM.
- Qwen2-VL, Qwen2.5-VL, Qwen3-VL (no official ToMe there): one unit per image and per video frame; the metric
  is the last vision block's keys with the vision RoPE applied, averaged over heads and over the 4 patches the
  PatchMerger joins into one token (the reduction VisionZip's official Qwen2.5-VL code applies to its keys); a
  merged token keeps its representative's M-RoPE (t, h, w) position (and, on Qwen3-VL, its DeepStack features).

The paper's placement, `placement="vision"` (LLaVA-1.5's CLIP tower; `vtc/adapters/vit_merge.py` does the
patching): r tokens are merged in every vision encoder layer up to the feature layer, between attention
and MLP, metric = that layer's keys averaged over heads, [CLS] protected, sizes tracked, proportional
attention (log size added to the keys' logits, `prop_attn=True`, the official default), the official
token order after each merge. `r` is an int (the same r in every layer up to the feature layer, as
`model.r = r`), a list (r per layer), or None: then `keep` sets it, r_l = ceil(tokens still to remove /
layers left), clamped to what one layer can merge (half the tokens); a note says so when `keep` cannot be
reached that way. Layers after the feature layer merge nothing (their output does not reach the LLM).
The grid does not exist after merging: each merged token enters the LLM at the position of its
representative (the surviving token of its group, recursively), kept tokens in raster order of those
positions; the projector still runs on one (copied) feature per original token, and the pre-LLM stage keeps
the representatives. Other adapters refuse `placement="vision"`.
"""

from __future__ import annotations

import torch

from .. import ops
from ..budget import tokens_to_keep
from .base import Strategy, VisualTokens, register_strategy


def merge_to_budget(
    features: torch.Tensor, metric: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeated ToMe merges of (I, N, D) features matched on (I, N, C) metric until k tokens remain.

    Returns (representative indices (I, k) ascending, merged features (I, k, D), sizes (I, k, 1))."""
    images, n, dim = features.shape
    index = torch.arange(n, device=features.device).expand(images, -1)
    x = torch.cat([features.float(), metric.float()], dim=-1)
    size = None
    while x.shape[1] > k:
        n = x.shape[1]
        r = min(n - k, (n + 1) // 2)
        x, size, keep = ops.bipartite_merge(x, r, size=size, metric=x[..., dim:], return_index=True)
        index = index.gather(1, keep)
    if size is None:
        size = torch.ones(images, n, 1, device=features.device)
    return index, x[..., :dim].to(features.dtype), size


def vision_schedule(n_tokens: int, k: int, layers: int) -> list[int]:
    """r per layer to merge n_tokens patch tokens (+ [CLS]) down to k over `layers` layers: ceil(left to
    remove / layers left), at most (tokens - 1) // 2 per layer (ToMe's clamp with the [CLS] protected)."""
    t, schedule = n_tokens + 1, []
    for layer in range(layers):
        need = max(0, t - 1 - k)
        r = min(-(-need // (layers - layer)), (t - 1) // 2)
        schedule.append(r)
        t -= r
    return schedule


@register_strategy
class ToMe(Strategy):
    name = "tome"
    aliases = ("token_merging",)
    stage = "pre_llm"
    paper = "Bolya et al., ICLR 2023, arXiv:2210.09461"
    default_keep = 0.25

    def __init__(
        self,
        keep: float | int = 0.25,
        metric: str = "keys",
        layer: int | None = None,
        placement: str = "pre_llm",
        r: int | list[int] | None = None,
        prop_attn: bool = True,
    ):
        super().__init__(keep)
        if metric not in ("keys", "features"):
            raise ValueError("metric must be 'keys' (feature-layer keys, as ToMe) or 'features' (projected features)")
        if placement not in ("pre_llm", "vision"):
            raise ValueError("placement must be 'pre_llm' (one merge before the LLM) or 'vision' (in every ViT layer)")
        if r is not None and placement != "vision":
            raise ValueError("r (tokens merged per vision layer) needs placement='vision'")
        rs = [r] if isinstance(r, int) else list(r or [])
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in rs):
            raise ValueError(f"r={r!r}: pass an int >= 0 or a list of them (tokens merged per vision layer)")
        self.metric = metric
        self.layer = layer
        self.placement = placement
        self.r = r
        self.prop_attn = prop_attn
        self.notes: list[str] = []

    def vision_merge_plan(self, num_layers: int, feature_layer: int, n_tokens: int) -> dict | None:
        """placement="vision": {"schedule": r per vision layer, "prop_attn", "layer": the feature layer}."""
        if self.placement != "vision":
            return None
        if isinstance(self.r, int):
            schedule = [self.r] * (feature_layer + 1)
        elif self.r is not None:
            if len(self.r) > num_layers:
                raise ValueError(f"r has {len(self.r)} entries but the vision tower has {num_layers} layers")
            schedule = list(self.r[: feature_layer + 1])
        else:
            k = tokens_to_keep(self.keep, n_tokens)
            schedule = vision_schedule(n_tokens, k, feature_layer + 1)
            left = n_tokens - sum(schedule)
            self.notes = []
            if left > k:
                self.notes.append(
                    f"tome(placement='vision'): keep={self.keep} asks {k} tokens, but merging at most half per "
                    f"layer in {feature_layer + 1} layers leaves {left}"
                )
        return {"schedule": schedule, "prop_attn": self.prop_attn, "layer": feature_layer}

    def check_adapter(self, adapter) -> None:
        if self.placement == "vision" and not adapter.vision_merge:
            raise NotImplementedError(
                f"ToMe inside the vision tower (placement='vision') is implemented for LLaVA-1.5's CLIP tower only, "
                f"not for {type(adapter.model).__name__}: use placement='pre_llm' (one merge before the LLM)"
            )

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        if self.metric != "keys" or self.placement == "vision":
            return {}
        layer = feature_layer if self.layer is None else self.layer
        return {"keys": [layer]}

    def describe(self) -> str:
        if self.placement == "vision":
            how = f"r={self.r}" if self.r is not None else f"keep={self.keep}"
            return f"tome(placement=vision, {how}, prop_attn={self.prop_attn})"
        return f"tome(keep={self.keep}, metric={self.metric})"

    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        if self.placement == "vision":
            return n_alive  # the tower's merging set the count
        return super().stage_budget(n_original, n_alive, stage)

    def select(self, visual: VisualTokens):
        if self.placement == "vision":  # the merged tokens, at their representatives (see vit_merge.py)
            probe = visual.vision.get("merge")
            if not probe:
                raise RuntimeError("tome(placement='vision'): the vision tower did not run with merging in this call")
            (rows,) = probe.values()
            return rows[:, 0] > 0.5
        n, k = visual.num_tokens, visual.budget
        if k >= n:
            return torch.arange(n, device=visual.features.device).expand(visual.num_images, -1)
        if self.metric == "keys":
            (keys,) = visual.vision["keys"].values()
            metric = keys.transpose(1, 2)  # (I, N, head_dim): keys averaged over heads
        else:
            metric = visual.features
        index, merged, _ = merge_to_budget(visual.features, metric, k)
        return index, merged
