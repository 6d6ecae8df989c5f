"""Random: a seeded uniform subset of each image's visual tokens (the usual lower baseline).

Not a paper method; used as the random-pruning baseline in e.g. FastV (Chen et al., ECCV 2024) and
VisionZip (Yang et al., CVPR 2025). Our choices:

- Each image keeps `budget` tokens drawn uniformly without replacement (`torch.randperm` on a CPU
  generator), re-sorted into raster order, at their original positions.
- Deterministic per image: the generator is seeded with `seed` and the image's index *within its sample*
  (its order of appearance in that prompt), so the same prompt gives the same selection whether it runs
  alone or in a batch, and the images of one multi-image prompt get different subsets.
- Pre-LLM only; nothing happens inside the LLM.
"""

from __future__ import annotations

import torch

from .base import Strategy, VisualTokens, register_strategy


def image_rank_in_sample(visual: VisualTokens) -> list[int]:
    """Each image's index among its own sample's images (0 for the first image of a prompt)."""
    layout = visual.context.get("layout")
    if layout is None or visual.image_index is None:
        return list(range(visual.num_images))
    samples = layout.sample_of_image
    first = {}
    for image, sample in enumerate(samples):
        first.setdefault(sample, image)
    return [int(i) - first[samples[int(i)]] for i in visual.image_index.tolist()]


def random_subset(n_tokens: int, k: int, seed: int) -> torch.Tensor:
    """(k,) sorted indices of a uniform subset of range(n_tokens), a pure function of (n_tokens, k, seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=generator)[:k].sort().values


@register_strategy
class RandomStrategy(Strategy):
    name = "random"
    aliases = ("random_prune", "rand")
    stage = "pre_llm"
    paper = "random-pruning baseline"
    default_keep = 0.25

    def __init__(self, keep: float | int = 0.25, seed: int = 0):
        super().__init__(keep)
        self.seed = int(seed)

    def describe(self) -> str:
        return f"random(keep={self.keep}, seed={self.seed})"

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        # seed and rank are mixed by a fixed odd multiplier so that (seed, rank) pairs do not collide
        rows = [random_subset(n, k, self.seed * 1_000_003 + rank) for rank in image_rank_in_sample(visual)]
        return torch.stack(rows).to(device)
