"""LLaVA-PruMerge+: keep the [CLS]-attention outliers and a spatial sample, merge the rest into them by key similarity.

Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models", arXiv:2403.15388
(github.com/42Shawn/LLaVA-PruMerge; PruMerge+ is `token_prune_merge_advanced_plus` in
llava/model/multimodal_encoder/clip_encoder.py, the version the repository's `forward` calls). As there:

- scores: the [CLS] query's attention at the LAST vision layer with all heads concatenated into one
  (softmax(q k^T / sqrt(D)) over the q_proj / k_proj outputs, the [CLS] column dropped): the
  "cls_single_head" probe; the merge metric: that layer's concatenated keys ("keys_concat");
- adaptive count (`if_adaptive=True`, keep=None, the default): the outliers of the image's scores by the
  interquartile range, score > Q3 + 1.5 IQR (`np.percentile`, linear); with n of them, `step = int(N / n)`
  and the tokens 0, s, 2s, ... below N - 1 with s = int(step / 3) (`arange(0, 575, ...)`) that are not
  outliers are added (the spatial sample);
- merge: each kept token i becomes x_i + sum over its 32 most key-similar other tokens j (cosine of the
  concatenated keys, over every other token, kept or not) of a_j x_j, a_j the [CLS] score.

With a `keep` (float or int k): the official non-adaptive path of the same function (`if_adaptive=False`,
`reduction_ratio = k / (2 N)`): the top int(N r) by score plus the tokens int(s/2), int(s/2) + s, ... below N - 1,
s = int(1 / r), each counted once (the official code keeps a duplicate twice), then the same merge.

Ours: the merged features are the projected ones a pre-LLM strategy sees (the official code merges the vision
tower's features before the projector, which is non-linear); the extra token the official code appends (the
score-weighted sum of the pruned tokens) is not added: vtc keeps tokens at original positions and adds none;
tokens stay in raster order at their original positions (the official order is outliers by score, then the
sample); the IQR is taken per image (the official code pools the images of one call); no outlier (official:
a division by zero) counts as one, a stride of 0 (official: an error) as 1; `N - 1` replaces the hard-coded 575.
Images keep different counts (a keep-mask). Needs a CLIP-style tower with [CLS] (LLaVA-1.5, LLaVA-NeXT); the
other adapters refuse its probes.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Strategy, VisualTokens, register_strategy

NEIGHBOURS = 32  # the official `topk(cos_sim_matrix, k=int(32))`


def outlier_count(scores: torch.Tensor) -> torch.Tensor:
    """(I,) tokens above Q3 + 1.5 IQR of each image's scores (I, N), at least 1."""
    q = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=scores.device), dim=1)
    upper = q[1] + 1.5 * (q[1] - q[0])
    return (scores.double() > upper[:, None]).sum(dim=1).clamp(min=1)


def plan(scores: torch.Tensor, top: torch.Tensor, first: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """(I, N) keep-mask: each image's `top` best-scored tokens, plus first, first + stride, ... below N - 1."""
    i, n = scores.shape
    rank = torch.sort(scores, dim=1, descending=True, stable=True).indices
    place = torch.arange(n, device=scores.device)
    mask = torch.zeros(i, n, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, rank, place[None] < top[:, None])
    sampled = (place[None] >= first[:, None]) & ((place[None] - first[:, None]) % stride[:, None] == 0)
    return mask | (sampled & (place[None] < n - 1))


def merge_into_kept(features, keys, scores, mask, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """(I, N, D): at kept tokens, x_i + sum of a_j x_j over the `neighbours` tokens j != i of largest key cosine."""
    n = features.shape[1]
    sim = ops.pairwise_cosine(keys, keys)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    near = sim.topk(min(neighbours, n - 1), dim=2).indices  # (I, N, m)
    weighted = features.float() * scores[..., None].float()
    rows = torch.arange(features.shape[0], device=features.device)[:, None, None]
    merged = features.float() + weighted[rows, near].sum(dim=2)
    return torch.where(mask[..., None], merged, features.float()).to(features.dtype)


@register_strategy
class PruMergePlus(Strategy):
    name = "prumerge_plus"
    aliases = ("prumerge+", "llava_prumerge_plus")
    stage = "pre_llm"
    paper = "Shang et al., arXiv:2403.15388"
    default_keep = None  # adaptive (IQR outliers + spatial sample)

    def __init__(self, keep: float | int | None = None):
        super().__init__(1.0 if keep is None else keep)
        self.adaptive = keep is None

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls_single_head": [num_layers - 1], "keys_concat": [num_layers - 1]}

    def check_adapter(self, adapter) -> None:
        if not adapter.has_cls():
            raise ValueError(
                f"strategy {self.name!r} reads [CLS] attention, but this model's vision tower has no [CLS] token "
                "(or its adapter does not provide PruMerge's single-head probe); choose a strategy that does not"
            )

    def describe(self) -> str:
        return f"prumerge_plus(keep={'adaptive' if self.adaptive else self.keep})"

    def select(self, visual: VisualTokens):
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if not self.adaptive and k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        (scores,) = visual.vision["cls_single_head"].values()
        (keys,) = visual.vision["keys_concat"].values()
        scores, keys = scores[:, 0].float(), keys.transpose(1, 2)
        if self.adaptive:  # the official float arithmetic (float64, as Python's): ratio = outliers / N
            ratio = outlier_count(scores).double() / n
            top = (n * ratio).floor().long()
            stride = ((1.0 / ratio).floor() / 3).floor().long().clamp(min=1)
            first = torch.zeros_like(top)
        else:
            ratio = k / (2 * n)
            top = torch.full((visual.num_images,), int(n * ratio), device=device)
            step = max(1, int(1 / ratio))
            stride, first = torch.full_like(top, step), torch.full_like(top, step // 2)
        mask = plan(scores, top, first, stride)
        return mask, merge_into_kept(visual.features, keys, scores, mask)
