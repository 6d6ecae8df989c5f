"""HiRED: [CLS]-attention-guided token budgets for the full image and the sub-images of anyres models.

Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models", AAAI 2025, arXiv:2408.10945 (github.com/hasanar1f/HiRED). Training-free, for
LLaVA-NeXT-style inputs: a full (base) image plus sub-images (crops), each a partition of N tokens.

As in the paper and the official code (`HiRED_token_selection` and `HiRED_sub_img_budgets` in its
modeling_llava_next.py), per image with P partitions (the base image and its crops), rate r and alpha a:

- Scores are the [CLS] query's attention to each patch, summed over heads, at two vision layers: an
  early one (layer 0 of 24: "budget layer", it says where the visual content is) and the feature layer
  (22 of 24, whose output feeds the projector: "selection layer", it says which tokens matter). For
  towers of other depths the budget layer stays 0 and the selection layer is the feature layer, as the
  other strategies do.
- Total budget T = int(P * N * r). The full image gets min(int(T * a), N) tokens, its top-k by its
  selection-layer scores.
- The sub-images share T - that (at most (P - 1) * N) in proportion to how many of the full image's top
  int(N * (1 - a)) budget-layer tokens fall in each sub-image's region: budget_i = floor(count_i * S /
  sum(count)), at most N.
- Each sub-image keeps its top-k by its own selection-layer scores.
- Defaults: r = 0.2, a = 0.5 (the official scripts). r >= 1 keeps everything (the official code only
  drops tokens when r < 1).

Our choices (documented deviations):

- Regions. The official code maps the full image's tokens to sub-images by cutting its N tokens (raster
  order) into P - 1 contiguous chunks, so with a 2 x 2 crop grid the top quarter of the full image's rows
  counts for the top-left crop. Default `regions="spatial"`: a full-image token belongs to the crop whose
  box (the crop's rectangle of the stitched, unpadded crop grid, `layout.extras["units"][u]["box"]`,
  scaled onto the full image's grid, which shows the same picture) contains the token's centre.
  `regions="chunks"` reproduces the official mapping (token t -> chunk floor(t * (P - 1) / N), the
  official reshape when N is a multiple of P - 1).
- The budget split is floor(count * S / sum) in exact integer arithmetic (the official code multiplies
  float32 ratios, which can differ by one); the remainder is not re-distributed (as the official code).
  If no budget-layer token falls in any sub-image (alpha = 1), sub-images keep nothing.
- A crop that the unpadding cut (edge crops lose padding rows or columns) keeps min(its budget, its real
  tokens), chosen among its real tokens; the official code picks among all N tokens, padding included,
  and then loses the picks that the unpadding removes. A crop that was padding only has no tokens and its
  share is lost, as in the official code.
- `image_newline` tokens are kept (vtc never drops them; the official HiRED code removes them all).
- The full image keeps at least one token.
- `keep`: a float is the rate r; an int k keeps k tokens per partition on average (T = P * k), the same
  total as a per-unit strategy with keep=k.
- Models without partitions (LLaVA-1.5, or an image that got no crops): the image is one partition and
  keeps its top int(N * r) (at least 1) by selection-layer [CLS] attention: the official HiRED code for
  LLaVA-1.5 (`modeling_llava.py`), alpha unused. The report says so in a note.
- Towers without [CLS] (SigLIP: LLaVA-OneVision; Qwen-VL's vision transformer) are refused at patch():
  HiRED's scores are [CLS] attention rows, and a surrogate would be a different method.
"""

from __future__ import annotations

import numbers

import torch

from .base import Strategy, VisualTokens, register_strategy, top_k_sorted

SINGLE_PARTITION_NOTE = (
    "hired: an image without sub-images is one partition and keeps its top int(N * rate) tokens by [CLS] "
    "attention at the feature layer (HiRED's LLaVA-1.5 rule; alpha unused)"
)


def total_budget(keep: float | int, partitions: int, tokens_per_partition: int) -> int:
    """HiRED's total token budget of one image: int(P * N * rate) for a float keep, P * keep for an int."""
    if isinstance(keep, numbers.Integral):
        return partitions * int(keep)
    return int(partitions * tokens_per_partition * float(keep))


def chunk_regions(n_tokens: int, n_sub: int, device=None) -> torch.Tensor:
    """The official mapping: full-image token t (raster order) -> sub-image floor(t * n_sub / n_tokens)."""
    return torch.arange(n_tokens, device=device) * n_sub // n_tokens


def spatial_regions(
    base_grid: tuple[int, int], stitched: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]], device=None
) -> torch.Tensor:
    """(h * w,) sub-image of each full-image token: the one whose box contains the token's centre, -1 if none.

    base_grid: (h, w) of the full image; stitched: (rows, cols) of the unpadded crop grid, which shows the
    same picture; boxes: sub-image index -> (row0, col0, row1, col1) in the stitched grid. Integer
    arithmetic: the centre of full-image row i is at stitched row (2i + 1) * rows / (2h)."""
    h, w = base_grid
    rows, cols = stitched
    ys = (2 * torch.arange(h, device=device) + 1) * rows  # in units of 1 / (2h) stitched rows
    xs = (2 * torch.arange(w, device=device) + 1) * cols
    region = torch.full((h, w), -1, dtype=torch.long, device=device)
    for sub, (r0, c0, r1, c1) in boxes.items():
        inside_r = (2 * h * r0 <= ys) & (ys < 2 * h * r1)
        inside_c = (2 * w * c0 <= xs) & (xs < 2 * w * c1)
        region[inside_r[:, None] & inside_c[None, :]] = sub
    return region.flatten()


def allocate(
    budget_scores: torch.Tensor, regions: torch.Tensor, n_sub: int, total: int, alpha: float
) -> tuple[int, torch.Tensor]:
    """HiRED's budgets for one image: (full-image budget, (n_sub,) sub-image budgets).

    budget_scores: (N,) the full image's budget-layer [CLS] attention (summed over heads), N tokens per
    partition; regions: (N,) sub-image of each full-image token (-1: none); total: the image's budget."""
    n = budget_scores.shape[-1]
    full = max(1, min(int(total * alpha), n))
    sub_total = min(total - full, n_sub * n)
    budgets = torch.zeros(n_sub, dtype=torch.long, device=budget_scores.device)
    if n_sub == 0 or sub_total <= 0:
        return full, budgets
    top = top_k_sorted(budget_scores[None], int(n * (1 - alpha)))[0]
    where = regions[top]
    counts = torch.bincount(where[where >= 0], minlength=n_sub)[:n_sub]
    if int(counts.sum()) == 0:
        return full, budgets
    budgets = (counts * sub_total).div(counts.sum(), rounding_mode="floor")
    return full, budgets.clamp(max=n)


@register_strategy
class HiRED(Strategy):
    name = "hired"
    aliases = ()
    stage = "pre_llm"
    paper = "Arif et al., AAAI 2025, arXiv:2408.10945"
    default_keep = 0.2

    def __init__(
        self,
        keep: float | int = 0.2,
        alpha: float = 0.5,
        regions: str = "spatial",
        budget_layer: int = 0,
        select_layer: int | None = None,
    ):
        super().__init__(keep)
        if regions not in ("spatial", "chunks"):
            raise ValueError("regions must be 'spatial' (crop boxes on the full image) or 'chunks' (official code)")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha}: the full image's share of the budget must lie in [0, 1]")
        self.alpha = float(alpha)
        self.regions = regions
        self.budget_layer = budget_layer
        self.select_layer = select_layer
        self.notes: list[str] = []
        self.budgets: dict[int, int] = {}  # unit -> tokens asked, filled by the last pre-LLM selection
        self._layers: tuple[int, int | None] = (budget_layer, select_layer)  # resolved by vision_probes

    def check_adapter(self, adapter) -> None:
        if not adapter.has_cls():  # a [CLS] surrogate (Qwen-VL's) would be another method
            raise ValueError(
                f"strategy {self.name!r} needs the vision tower's own [CLS] token (a surrogate would be another "
                f"method), and this model's vision tower has none; choose a strategy that does not (e.g. fopru, fastv)"
            )

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        select = feature_layer if self.select_layer is None else self.select_layer
        self._layers = (self.budget_layer, select)
        return {"cls": sorted({self.budget_layer, select})}

    def describe(self) -> str:
        return f"hired(keep={self.keep}, alpha={self.alpha}, regions={self.regions})"

    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        return n_alive  # HiRED sets each unit's budget itself (see select)

    def _keeps_all(self, tokens_per_partition: int) -> bool:
        if isinstance(self.keep, numbers.Integral):
            return int(self.keep) >= tokens_per_partition
        return float(self.keep) >= 1.0

    def select(self, visual: VisualTokens) -> torch.Tensor:
        """A keep-mask (I, n): the units of one call (base images or crops of one shape) keep different counts."""
        budget_layer, select_layer = self._layers
        scores = visual.cls_attention[select_layer].sum(dim=1)  # (I, n), summed over heads
        layout = visual.context.get("layout")
        vision = visual.context.get("vision") or {}
        units = layout.extras.get("units") if layout is not None else None
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        if 0 in visual.image_index.tolist():  # the first call of a forward (unit 0 is in the first group)
            self.budgets = {}
        plans: dict[tuple, tuple[int, torch.Tensor]] = {}
        for row, unit in enumerate(visual.image_index.tolist()):
            budget = self._unit_budget(unit, visual.num_tokens, units, layout, vision, budget_layer, plans)
            self.budgets[unit] = budget
            if budget > 0:
                mask[row, top_k_sorted(scores[row : row + 1], budget)[0]] = True
        return mask

    def _single(self, n: int) -> int:
        if SINGLE_PARTITION_NOTE not in self.notes:
            self.notes.append(SINGLE_PARTITION_NOTE)
        return n if self._keeps_all(n) else max(1, min(total_budget(self.keep, 1, n), n))

    def _unit_budget(
        self, unit: int, n: int, units: list[dict] | None, layout, vision: dict, budget_layer: int, plans: dict
    ) -> int:
        """Tokens unit `unit` (n tokens) keeps: its image's plan (computed once per call), or the single-partition
        rule for models and images without sub-images."""
        if units is None or units[unit].get("role") not in ("base", "crop"):
            return self._single(n)
        info = units[unit]
        image = layout.extras["images"][info["image"]]
        nh, nw = image["crops"]
        if nh * nw == 0:
            return self._single(n)
        key = (info["sample"], info["image"])
        if key not in plans:
            plans[key] = self._plan(info, image, units, vision, budget_layer)
        full, sub = plans[key]
        if info["role"] == "base":
            return full
        i, j = info["crop"]
        return min(int(sub[i * nw + j]), n)

    def _plan(
        self, info: dict, image: dict, units: list[dict], vision: dict, budget_layer: int
    ) -> tuple[int, torch.Tensor]:
        """(full-image budget, sub-image budgets in crop order i * nw + j) of the image of unit `info`."""
        same = [
            (u, x) for u, x in enumerate(units) if x["sample"] == info["sample"] and x.get("image") == info["image"]
        ]
        base_unit, base = next((u, x) for u, x in same if x["role"] == "base")
        h, w = base["grid"]
        n = h * w
        nh, nw = image["crops"]
        n_sub = nh * nw
        if self._keeps_all(n):
            return n, torch.full((n_sub,), n, dtype=torch.long)
        probe = vision["cls"][budget_layer][base_unit, :, :n].sum(dim=0)  # (N,) summed over heads
        if self.regions == "chunks":
            regions = chunk_regions(n, n_sub, probe.device)
        else:
            boxes = {x["crop"][0] * nw + x["crop"][1]: x["box"] for _, x in same if x["role"] == "crop"}
            regions = spatial_regions((h, w), image["grid"], boxes, probe.device)
        return allocate(probe, regions, n_sub, total_budget(self.keep, 1 + n_sub, n), self.alpha)
