"""VisionZip: keep the dominant tokens by [CLS] attention, merge the rest into a few contextual tokens.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025
(github.com/dvlab-research/VisionZip). As in the official code (visionzip/clip_encoder.py, lines 43-83,
`CLIPVisionTower_VisionZip.forward`; visionzip/utils.py line 89 for the metric):

- Attention and metric come from the encoder layer whose output feeds the projector (`attentions[-2]`,
  `layers[-2].metric` for LLaVA-1.5: layer 22 of 24, our `feature_layer`).
- Dominant tokens: the patches with the largest [CLS] attention summed over heads (`cls_attention.sum(1)`,
  the [CLS] column excluded), kept in raster order.
- Contextual tokens: the remaining R tokens' metric is the layer's KEYS averaged over heads
  (`raw_key_states.mean(1)`), L2-normalised; targets sit at a uniform stride among the remaining tokens
  (`step = max(1, R // contextual)`, `arange(0, R, step)[:contextual]`); every other remaining token joins
  the target of highest cosine similarity (argmax, ties to the lower target).
- What the official repository says about budgets (read in visionzip/main.py and README.md): the code
  default is `visionzip(model, dominant=191, contextual=30)` (190 patches + the [CLS] state + 30 contextual
  = 221 tokens); the README's example is `dominant=54, contextual=10` (53 patches + [CLS] + 10 = 64 tokens).
  Ours: every budget k keeps the README's ratio, contextual = round(k * 10 / 64) and dominant = k - contextual
  (64 -> 54 + 10 as the README; 128 -> 108 + 20 and 192 -> 162 + 30 are our extrapolation, not read from the
  official code, which sets no split per budget).

Our choices (documented deviations):

- LLaVA-HF's "default" feature select drops the [CLS] state before the projector, so there is no [CLS]
  token to keep: its slot goes to one more dominant patch (64 = 54 dominant patches + 10 contextual).
- The official code merges the vision tower's hidden states *before* the projector; a pre-LLM strategy sees
  the projected features, so we merge those (the projector is non-linear, so this is not identical).
- Merge rule: `merge="mean"` (default) gives each contextual token the average of its target and every
  token assigned to it, the paper's "merged by averaging"; `merge="official"` reproduces the official
  formula `target + mean(assigned)` (lines 75-80), which doubles the magnitude of a merged token.
- Positions: the official code appends the contextual tokens after the dominant ones (consecutive
  positions); here each contextual token takes its target's original position, so kept and merged tokens
  stay in raster order at their original positions.
- If the strategy sees fewer tokens than the budget needs (e.g. keep=1.0), nothing is merged.

The keys probe: the adapter's "keys" vision probe (keys of the feature layer averaged over heads, tokens
last), read from `visual.vision["keys"]`.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL (no [CLS]), after the official Qwen2.5-VL code (Qwen2_5_VL/qwen2_5vl_visionzip.py
at commit 68993a3 of the repository above: `Qwen2_5_VisionTransformerPretrainedModel.forward` for the scores,
`Qwen2_5_VLForConditionalGeneration.forward` for the selection):

- Layer: the last vision block (the merger's input; in Qwen2.5-VL a full-attention block, so the attention is
  over the whole image or frame, not a window). Our `feature_layer` there.
- Dominant score: the attention each merged token receives in that block (the adapter's [CLS] surrogate:
  softmax(q k^T / sqrt(d)) with the vision RoPE, mean over heads, over the queries of its image/frame, and over
  the 4 patches the merger joins). The official code sums over the queries; the ranking is the same.
- Keys: the rotated keys of that block averaged over heads and over the 4 patches of each merged token.
- Budget: the official code keeps int(0.65 N) dominant + max(int(0.05 N), 1) contextual tokens of N (its README
  also reports 0.45 + 0.05); so on towers without [CLS] the contextual count is max(int(0.05 N), 1) of the unit's
  N tokens (`contextual_share=0.05`, any share can be passed) and the dominant ones fill the rest of `keep`:
  `keep=0.70` is the official setting up to rounding (round(0.7 N) here; an int keep of int(0.65 N) +
  max(int(0.05 N), 1) reproduces it exactly).
- Merging: the official code merges the LLM input embeddings (after the PatchMerger), as we do; its formula is
  target + mean(assigned) (`merge="official"`); the default stays `merge="mean"`.
- M-RoPE positions: the official code computes the (t, h, w) ids on the full sequence, then keeps the dominant
  tokens and writes each contextual token at its target's place (`inputs_embeds[:, contexual_input_idx]`,
  `position_ids[:, :, img_mask]`): every kept or merged token keeps its original (t, h, w) position, the merged
  one its target's, and decoding continues after the logical length (its rope deltas are of the full sequence).
  vtc does the same, so here positions are not a deviation.
- Deviations: the official code handles one image per prompt with batch size 1 (it selects over all image tokens
  of the prompt at once; its video branch was not adapted, so videos are not pruned); vtc selects per unit
  (each image, each video frame, with its own budget) in batches. Its flash-attention path softmaxes over the
  tokens of all images together, its eager path per image; we follow the eager path (the layer's segments).
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy, top_k_sorted

QWEN_CONTEXTUAL_SHARE = 0.05  # official Qwen2.5-VL code: contextual_num = max(int(0.05 * N), 1)


def split_budget(
    k: int, contextual: int | None = None, n: int | None = None, share: float | None = None
) -> tuple[int, int]:
    """(dominant, contextual) for a budget of k tokens out of n: contextual = `contextual` if given, else
    max(int(n * share), 1) with a `share` (the official Qwen2.5-VL rule), else round(k * 10 / 64) (LLaVA's)."""
    if contextual is not None:
        c = int(contextual)
    elif share is not None:
        c = max(int(n * share), 1)
    else:
        c = round(k * 10 / 64)
    c = max(0, min(c, k - 1)) if k > 1 else 0
    return k - c, c


def contextual_merge(
    features: torch.Tensor, metric: torch.Tensor, contextual: int, merge: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens among R remaining tokens.

    features (I, R, D), metric (I, R, C). Returns (target indices (c,) into the R tokens, merged (I, c, D))."""
    _, r, _ = features.shape
    device = features.device
    step = max(1, r // contextual)
    targets = torch.arange(0, r, step, device=device)[:contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=device)
    is_target[targets] = True
    others = (~is_target).nonzero().squeeze(1)
    sim = ops.pairwise_cosine(metric[:, others], metric[:, targets])  # (I, R - c, c)
    assign = torch.nn.functional.one_hot(sim.argmax(dim=-1), targets.numel()).float()  # (I, R - c, c)
    summed = assign.transpose(1, 2) @ features[:, others].float()  # (I, c, D)
    counts = assign.sum(dim=1)[..., None]  # (I, c, 1)
    target_features = features[:, targets].float()
    if merge == "official":
        merged = target_features + summed / counts.clamp(min=1)
    else:
        merged = (target_features + summed) / (counts + 1)
    return targets, merged.to(features.dtype)


@register_strategy
class VisionZip(Strategy):
    name = "visionzip"
    aliases = ("vision_zip",)
    stage = "pre_llm"
    paper = "Yang et al., CVPR 2025, arXiv:2412.04467"
    default_keep = 64 / 576

    def __init__(
        self,
        keep: float | int = 64 / 576,
        contextual: int | None = None,
        merge: str = "mean",
        layer: int | None = None,
        contextual_share: float | None = None,
    ):
        super().__init__(keep)
        if merge not in ("mean", "official"):
            raise ValueError("merge must be 'mean' (average of a target and its tokens) or 'official'")
        if contextual_share is not None and not 0 < contextual_share < 1:
            raise ValueError(f"contextual_share={contextual_share}: pass a fraction in (0, 1) of each unit's tokens")
        self.contextual = contextual
        self.merge = merge
        self.layer = layer
        self.contextual_share = contextual_share
        self._share = contextual_share  # the rule in use: set at patch() from the model when not given

    def check_adapter(self, adapter) -> None:
        if self.contextual_share is None:  # towers without [CLS] (Qwen-VL): the official Qwen2.5-VL rule
            self._share = None if adapter.has_cls() else QWEN_CONTEXTUAL_SHARE

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        layer = feature_layer if self.layer is None else self.layer
        return {"cls": [layer], "keys": [layer]}

    def describe(self) -> str:
        share = f", contextual_share={self._share}" if self._share is not None else ""
        return f"visionzip(keep={self.keep}, merge={self.merge}{share})"

    def select(self, visual: VisualTokens):
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        (cls,) = visual.cls_attention.values()  # (I, heads, N)
        dominant_k, contextual_k = split_budget(k, self.contextual, n, self._share)
        dominant = top_k_sorted(cls.sum(dim=1), dominant_k)  # (I, d)
        if contextual_k == 0:
            return dominant
        (keys,) = visual.vision["keys"].values()
        metric = keys.transpose(1, 2)  # (I, N, head_dim): keys averaged over heads
        rest_mask = torch.ones(visual.num_images, n, dtype=torch.bool, device=device)
        rest_mask.scatter_(1, dominant, False)
        rest = torch.arange(n, device=device).expand(visual.num_images, -1)[rest_mask].view(visual.num_images, -1)
        gather = rest[..., None]
        targets, merged = contextual_merge(
            visual.features.gather(1, gather.expand(-1, -1, visual.features.shape[-1])),
            metric.gather(1, gather.expand(-1, -1, metric.shape[-1])),
            contextual_k,
            self.merge,
        )
        index = torch.cat([dominant, rest[:, targets]], dim=1)
        features = torch.cat(
            [visual.features.gather(1, dominant[..., None].expand(-1, -1, merged.shape[-1])), merged], 1
        )
        order = index.argsort(dim=1)
        return index.gather(1, order), features.gather(1, order[..., None].expand(-1, -1, features.shape[-1]))
