"""ATP: adaptive, instance-wise visual-token pruning inside the LLM with learned thresholds.

Ye, Gan, Ge, Zhang, Tang, "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", CVPR 2025
(arXiv:2412.00447). Claim: the right pruning ratio differs per decoder layer and per image-prompt pair, so
small Adaptive Token Pruning (ATP) modules between decoder layers predict, per instance, a threshold on a
token score; with Spatial Augmented Pruning (SAP) a uniform 2-D sample of the token grid survives too.
Trained with soft (sigmoid) masks and a budget loss; at inference the masks are hard and each image keeps
its own number of tokens (144 of 576 on average in the paper, i.e. keep = 0.25).

What follows the paper:
- ATP modules before three decoder layers, the paper's 4, 14, 24 of 32, scaled to the depth
  (round(L * 4/32), round(L * 14/32), round(L * 24/32), at least 1); `layers=` overrides.
- Redundancy score of each visual token = mean of a self-modality score (the attention it receives from
  the visual queries) and a cross-modality score (the attention it receives from the text queries),
  from the attention of the layer before the module, recomputed from q and k (`vtc.probes.project_qk`),
  never `output_attentions`.
- Spatial score: a uniform 2-D sample of the token grid, every `stride`-th row and column (default 2),
  is always kept, whatever the redundancy score says.
- A learnable instance-wise threshold per module, predicted by a small MLP from pooled features; training
  uses sigmoid soft masks sigmoid(temperature * (score - threshold)), temperature 10, inference hard masks
  (score > threshold); a budget loss pulls the mean visual-token count to the target set by `keep`.

Our choices (no official code was found):
- Queries: the self score of a token averages, over heads, the attention from the visual queries of the
  same image that can see it (causal: those at or after it; in training weighted by their soft masks);
  the cross score averages the attention from the sample's prompt text tokens after the image's last
  token (the instruction). Softmax over the whole causal row, as the layer computes it.
- Scale: each score is normalised to sum to 1 over the image's alive tokens; the redundancy score is
  n_alive * (self + cross) / 2, so its mean is 1 whatever the token count and one threshold scale fits
  every layer (images with no text after them use the self score alone).
- Threshold MLP (per module): input concat(layer_norm(mean of the image's alive visual hidden states),
  layer_norm(mean of the prompt's text hidden states after the image)), both at the module's input
  (the output of the layer before), in float32, no affine parameters in the norms; Linear(2d -> 256), GELU,
  Linear(256 -> 1), softplus (a positive threshold); initialised so that every threshold starts at 1.
  One threshold per image (an image of a multi-image sample is its own instance), per module.
- Soft masks in training act in the model: the cumulative mask c (the product of the modules' masks so
  far) is added as log c to the attention logits of every query for the visual keys in all deeper layers
  (DynamicViT-style masked attention). With hard 0/1 masks this is exactly dropping the tokens.
- Budget: `keep` sets the fallback's per-module counts, geometric from the count N entering the first
  module (every token alone; what a pre-LLM member left, in a composition) to keep * N at the last module
  (0.63 / 0.40 / 0.25 of N for keep = 0.25; an int keep is the last module's count); the training target
  is the decoder-layer-averaged visual-token fraction that this schedule realises (compute-matched), a
  squared error on the batch mean (batch-level, so that instances may differ).

Without trained weights it does not pretend to be ATP: it warns at `patch()` and the report says so. The
fallback keeps, at each module, exactly the scheduled count: the alive stride grid plus the top redundancy
scores (when the grid alone exceeds the last module's budget, its stride grows until it fits, the same
grid at every module).

Weights: `vtc.train(model, strategy="atp", data=..., save="atp.safetensors")` (see `vtc/train/atp.py`);
`vtc.patch(model, "atp", weights="atp.safetensors")` loads them (keys `modules.{j}.fc1.weight`, ...; the
module layers are in the file's metadata).
"""

from __future__ import annotations

import math
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import tokens_to_keep
from ..local import PerThread
from ..probes import project_qk
from .base import Strategy, VisualTokens, check_weights_width, read_safetensors, register_strategy, top_k_sorted

PAPER_LAYERS = (4, 14, 24)  # of 32
MLP_HIDDEN = 256


class ThresholdMLP(nn.Module):
    """Linear(2d -> 256), GELU, Linear(256 -> 1), softplus: one positive threshold per instance."""

    def __init__(self, dim: int, hidden: int = MLP_HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.fc2(self.act(self.fc1(x)))).squeeze(-1)


def make_modules(hidden_size: int, count: int, seed: int = 0) -> nn.ModuleList:
    """`count` threshold MLPs, seeded; each starts with a threshold of 1 (the mean score) for every input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = nn.ModuleList(ThresholdMLP(hidden_size) for _ in range(count))
    for module in modules:
        with torch.no_grad():
            module.fc2.weight.mul_(0.01)
            module.fc2.bias.fill_(math.log(math.e - 1.0))  # softplus^-1(1)
    return modules


def save_modules(modules: nn.ModuleList, path: str | Path, layers: list[int], num_layers: int, stride: int) -> None:
    from safetensors.torch import save_file

    state = {
        f"modules.{j}.{k}": v.detach().cpu().contiguous()
        for j, module in enumerate(modules)
        for k, v in module.state_dict().items()
    }
    meta = {"format": "pt", "strategy": "atp", "layers": ",".join(map(str, layers)), "num_layers": str(num_layers)}
    save_file(state, str(path), metadata={**meta, "stride": str(stride)})


def load_modules(path: str | Path) -> tuple[nn.ModuleList, list[int], int, int]:
    """(threshold MLPs, their decoder layers, the decoder depth and grid stride they were trained with) from a
    safetensors file written by `save_modules`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"atp weights not found: {str(path)!r} is not a file; train them with vtc.train(model, strategy='atp', "
            f"data=..., save={str(path)!r}), or pass weights=None for the announced training-free fallback"
        )
    state, meta = read_safetensors(path, "atp")
    if meta.get("strategy") != "atp" or "layers" not in meta:
        raise ValueError(f"{path} is not an ATP weight file written by vtc.train(model, strategy='atp')")
    layers = [int(x) for x in meta["layers"].split(",")]
    hidden, two_d = state["modules.0.fc1.weight"].shape
    modules = nn.ModuleList(ThresholdMLP(two_d // 2, hidden) for _ in layers)
    for j, module in enumerate(modules):
        module.load_state_dict({k: state[f"modules.{j}.{k}"].float() for k in module.state_dict()})
    return modules.eval(), layers, int(meta["num_layers"]), int(meta.get("stride", 2))


def default_layers(num_layers: int) -> list[int]:
    """The paper's 4, 14, 24 of 32 scaled to `num_layers` (at least 1, at most L-1, distinct)."""
    layers = [min(num_layers - 1, max(1, int(num_layers * p / 32 + 0.5))) for p in PAPER_LAYERS]
    return sorted(set(layers))


def schedule(n: int, final: int, modules: int) -> list[int]:
    """Fallback counts per module: geometric from n to `final` at the last module."""
    if n == 0:
        return [0] * modules
    ratio = final / n
    return [max(final, min(n, int(n * ratio ** ((j + 1) / modules) + 0.5))) for j in range(modules)]


def layer_average(counts: list[float], layers: list[int], num_layers: int, n: float) -> float:
    """Visual tokens per decoder layer averaged over all layers, as a fraction of n (the budget's unit)."""
    edges = [*layers, num_layers]
    total = layers[0] * n + sum((edges[j + 1] - edges[j]) * c for j, c in enumerate(counts))
    return total / (num_layers * n)


def grid_mask(token_ids: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """(I, n) bool: tokens on every `stride`-th row and column of the raster grid (from row/col 0)."""
    cols = grid[1]
    return ((token_ids // cols) % stride == 0) & ((token_ids % cols) % stride == 0)


def fitting_stride(grid: tuple[int, int], stride: int, budget: int) -> int:
    """The smallest stride >= `stride` whose full grid sample has at most `budget` tokens."""
    rows, cols = grid
    s = stride
    while -(-rows // s) * -(-cols // s) > budget and s < max(rows, cols):
        s += 1
    return s


def attention_scores(
    layer: nn.Module,
    hidden: torch.Tensor,
    positions_emb: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
    image: torch.Tensor,
    query_weight: torch.Tensor,
    text_ok: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (self, cross) scores, each (B, L), at a Llama/Qwen2-style decoder layer (see module docstring).

    image: (B, L) image id of each visual token (-1: text or padding); query_weight: (B, L) weight of each
    visual token as a query (1 alive, the soft mask in training); text_ok: (B, L) text tokens usable as
    queries; key_bias: (B, L) added to the attention logits of every query for that key (training: log of
    the soft mask). Query rows are computed `chunk` at a time: never the whole (L x L) map per head."""
    q, k = project_qk(layer, hidden, positions_emb)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    b, length = valid.shape
    device = hidden.device
    pos = torch.arange(length, device=device)
    end = torch.full((b, int(image.max()) + 2), -1, dtype=torch.long, device=device)
    end = end.scatter_reduce(1, image + 1, pos.expand(b, -1), "amax")  # last index of each image (+1 shift)
    key_end = end.gather(1, image + 1).masked_fill(image < 0, length)  # text keys: no text query after them
    sums = [torch.zeros(b, length, device=device) for _ in range(4)]  # self, self count, cross, cross count
    for start in range(0, length, chunk):
        rows = slice(start, min(length, start + chunk))
        logits = (q[:, :, rows] @ k.transpose(-1, -2)) * layer.self_attn.scaling  # (B, H, C, L)
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :]
        causal = pos[None, :] <= pos[rows, None]  # (C, L)
        allowed = (valid[:, None, :] & causal) | (pos[None, :] == pos[rows, None])
        attn = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # (B, C, L)
        same = ((image[:, rows, None] == image[:, None, :]) & (image[:, rows, None] >= 0) & causal).float()
        same = same * query_weight[:, rows, None]
        after = text_ok[:, rows, None] & (pos[rows][None, :, None] > key_end[:, None, :])
        for i, weight in enumerate((same, after)):
            sums[2 * i] += (attn * weight).sum(1)
            sums[2 * i + 1] += weight.sum(1)
    return sums[0] / sums[1].clamp(min=1), sums[2] / sums[3].clamp(min=1)


def normalise(
    raw_self: torch.Tensor, raw_cross: torch.Tensor, image: torch.Tensor, weight: torch.Tensor, n_images: int
) -> torch.Tensor:
    """Redundancy score (B, L): n_alive * (self + cross) / 2, each part summing to 1 over an image's alive
    tokens (weighted by `weight`: 1 for alive tokens, the soft mask in training); self alone without text."""
    flat_img = image.reshape(-1)
    vis = flat_img >= 0
    idx = flat_img.clamp(min=0)
    w = weight.reshape(-1) * vis

    def per_image(x):
        return torch.zeros(n_images, device=x.device, dtype=x.dtype).index_add(0, idx, x * w)

    count = torch.zeros(n_images, device=w.device).index_add(0, idx, w)
    parts = []
    for raw in (raw_self, raw_cross):
        flat = raw.reshape(-1).float()
        total = per_image(flat)
        parts.append((flat / total[idx].clamp(min=1e-30), total > 0))
    (p_self, _), (p_cross, has_cross) = parts
    score = torch.where(has_cross[idx], (p_self + p_cross) / 2, p_self) * count[idx]
    return score.masked_fill(~vis, 0.0).view_as(raw_self)


@register_strategy
class ATP(Strategy):
    name = "atp"
    aliases = ("atp_llava",)
    stage = "llm"
    paper = "Ye et al., ATP-LLaVA, CVPR 2025, arXiv:2412.00447"
    default_keep = 0.25
    needs_keys = True
    text_queries = "last"
    _cache = PerThread(None)  # this thread's last stage scores (per call)
    _entering = PerThread({})  # fallback: tokens of each image at the first module, this thread's call

    def __init__(
        self,
        keep: float | int = 0.25,
        weights: str | Path | None = None,
        layers: list[int] | tuple[int, ...] | None = None,
        stride: int | None = None,
        temperature: float = 10.0,
    ):
        """keep: the fallback's last-module count and the training target; with `weights` the learned
        thresholds set the counts and only keep=1.0 (everything kept) changes them. stride: the always-kept
        grid (default 2, or the one the weights were trained with). layers: the modules' decoder layers."""
        super().__init__(keep)
        if stride is not None and int(stride) < 1:
            raise ValueError(f"atp stride={stride}: pass a grid stride >= 1")
        self.weights, self.temperature = weights, float(temperature)
        self.modules: nn.ModuleList | None = None
        self.trained_depth: int | None = None
        self.layer_option = list(layers) if layers is not None else None
        trained_stride = 2
        if weights is not None:
            self.modules, trained_layers, self.trained_depth, trained_stride = load_modules(weights)
            if self.layer_option is not None and self.layer_option != trained_layers:
                raise ValueError(f"atp weights were trained for layers {trained_layers}; drop layers= or retrain")
            self.layer_option = trained_layers
        self.stride = int(stride) if stride is not None else trained_stride
        self.layers: list[int] = []
        self.num_layers: int | None = None
        self.notes: list[str] = []
        self.soft = False  # training (vtc.train): soft masks, every token stays in the sequence
        self._tail: torch.Tensor | None = None  # training: answer tokens at the end of each row
        self._bias: torch.Tensor | None = None  # training: (B, L) log of the cumulative soft mask
        self._kept: list[tuple] = []  # training: per module and image group, (stage, images, soft count, n)
        self._cache = None
        self._entering: dict[int, int] = {}  # fallback: tokens of each image at the first module
        if self.modules is None:
            self._announce()

    @classmethod
    def with_modules(
        cls,
        modules: nn.ModuleList,
        layers: list[int],
        keep: float | int = 0.25,
        stride: int = 2,
        temperature: float = 10.0,
        soft: bool = False,
    ) -> ATP:
        """An ATP using these threshold modules (e.g. freshly made, or being trained with `soft=True`: soft
        masks, every token stays); no fallback, no warning."""
        self = cls.__new__(cls)
        Strategy.__init__(self, keep)
        self.weights, self.stride, self.temperature = None, int(stride), float(temperature)
        self.modules, self.trained_depth, self.layer_option = modules, None, list(layers)
        self.layers, self.num_layers, self.notes = [], None, []
        self.soft, self._tail, self._bias, self._kept, self._cache = bool(soft), None, None, [], None
        self._entering = {}
        return self

    @classmethod
    def for_training(cls, modules: nn.ModuleList, keep, layers: list[int], stride: int = 2, temperature: float = 10.0):
        """An ATP in soft-mask mode using these (being trained) modules."""
        return cls.with_modules(modules, layers, keep, stride, temperature, soft=True)

    def _announce(self) -> None:
        message = (
            f"atp without trained threshold weights: NOT the paper's learned instance-wise thresholds, a "
            f"training-free fallback: at each module a fixed per-layer budget (geometric down to keep={self.keep}) "
            f"of the top redundancy scores united with the stride-{self.stride} grid. Train with "
            f"vtc.train(model, strategy='atp', data=..., save=path) and pass weights=path"
        )
        warnings.warn(message, UserWarning, stacklevel=5)  # the caller of vtc.patch
        self.notes.append(message)

    def check_adapter(self, adapter) -> None:
        if self.modules is not None:
            width = self.modules[0].fc1.in_features // 2
            check_weights_width("atp", self.weights, width, adapter.language_model.config.hidden_size)

    def prune_layers(self, num_layers: int) -> list[int]:
        if self.trained_depth is not None and self.trained_depth != num_layers:
            raise ValueError(
                f"atp weights were trained for a {self.trained_depth}-layer decoder, this one has {num_layers}: "
                f"train weights for this model with vtc.train"
            )
        layers = self.layer_option if self.layer_option is not None else default_layers(num_layers)
        if not layers or sorted(set(layers)) != list(layers) or not all(1 <= x < num_layers for x in layers):
            raise ValueError(f"atp layers={layers}: pass increasing decoder layers in [1, {num_layers - 1}]")
        if self.modules is not None and len(self.modules) != len(layers):
            raise ValueError(f"atp has {len(self.modules)} threshold modules for {len(layers)} layers")
        self.layers, self.num_layers = list(layers), num_layers
        return list(layers)

    def describe(self) -> str:
        where = ",".join(map(str, self.layers or self.layer_option or ["auto"]))
        if self.modules is None:
            return f"atp(FALLBACK: top-k + stride-{self.stride} grid, no weights, keep={self.keep}, layers={where})"
        source = f"={self.weights}" if self.weights else ""
        return f"atp(thresholds{source}, stride={self.stride}, layers={where})"

    def final_count(self, n: int) -> int:
        return tokens_to_keep(self.keep, n) if not isinstance(self.keep, int) else min(self.keep, n)

    def target_fraction(self, n: int, num_layers: int) -> float:
        """The decoder-layer-averaged visual fraction the fallback schedule realises (training's target)."""
        return layer_average(schedule(n, self.final_count(n), len(self.layers)), self.layers, num_layers, n)

    def _fallback_budgets(self, visual: VisualTokens) -> tuple[list[int], list[int]]:
        """Per image of the group: (this module's count, the last module's count), from the schedule of the
        tokens that entered the first module (all of them used alone; what a pre-LLM member left otherwise)."""
        n, j = visual.num_tokens, self.layers.index(visual.stage)
        images = visual.image_index.tolist()
        if j == 0:
            self._entering.update({image: n for image in images})
        entering = [self._entering.get(image, n) for image in images]
        finals = [self.final_count(e) for e in entering]
        return [min(n, schedule(e, f, len(self.layers))[j]) for e, f in zip(entering, finals)], finals

    # --- scores and thresholds, once per stage for the whole batch -----------------------------------
    def _stage(self, visual: VisualTokens) -> dict:
        context, stage = visual.context, visual.stage
        seq = context["sequence"]
        cached = self._cache
        if cached is not None and cached[0]() is seq and cached[1] == stage:
            return cached[2]
        probe, layout, lm = context["probe"], context["layout"], context["lm"]
        device = seq.hidden.device
        b, length = seq.valid.shape
        n_images = len(layout.counts)
        unit = torch.empty(sum(layout.counts), dtype=torch.long, device=device)
        for u in range(n_images):
            unit[layout.unit_tokens(u, device)] = u
        is_vis = (seq.vis_index >= 0) & seq.valid
        image = torch.where(is_vis, unit[seq.vis_index.clamp(min=0)], -1)
        prompt = seq.valid.clone()
        if self._tail is not None:  # training: the answer is no query
            prompt &= torch.arange(length, device=device) < length - self._tail.to(device)[:, None]
        text_ok = prompt & ~is_vis
        if self.soft and stage == self.layers[0]:
            self._bias, self._kept = torch.zeros(b, length, device=device), []
        weight = self._bias.exp() if self.soft else torch.ones(b, length, device=device)
        layer = lm.layers[stage - 1]
        hidden_in = probe["hidden_in"]
        with torch.no_grad():
            emb = lm.rotary_emb(hidden_in, seq.positions)
            bias = self._bias.detach() if self.soft else None
            query_weight = weight.detach() * is_vis
            raw = attention_scores(layer, hidden_in.detach(), emb, seq.valid, image, query_weight, text_ok, bias)
        score = normalise(*raw, image, weight.detach(), n_images)
        out = {"score": score.reshape(-1), "image": image}
        if self.modules is not None:
            out["theta"] = self._thresholds(seq.hidden, image, text_ok, weight, layout, stage)
        self._cache = (weakref.ref(seq), stage, out)
        return out

    def _thresholds(self, hidden, image, text_ok, weight, layout, stage) -> torch.Tensor:
        """(images,) threshold of each image at this module from its pooled features."""
        b, length, dim = hidden.shape
        n_images = len(layout.counts)
        x = hidden.float().reshape(b * length, dim)
        flat_img = image.reshape(-1)
        vis = flat_img >= 0
        w = (weight.reshape(-1) * vis)[:, None]
        idx = flat_img.clamp(min=0)
        vis_mean = torch.zeros(n_images, dim, device=x.device).index_add(0, idx, x * w)
        vis_mean = vis_mean / torch.zeros(n_images, 1, device=x.device).index_add(0, idx, w).clamp(min=1e-6)
        pos = torch.arange(length, device=x.device)
        last = torch.full((n_images,), -1, dtype=torch.long, device=x.device)
        last = last.scatter_reduce(0, idx[vis], pos.repeat(b)[vis], "amax")
        sample = torch.tensor(layout.sample_of_image, device=x.device)
        text = text_ok[sample] & (pos[None, :] > last[:, None])  # (images, L)
        rows = hidden.float()[sample]  # (images, L, D)
        text_mean = (rows * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
        features = torch.cat([F.layer_norm(vis_mean, (dim,)), F.layer_norm(text_mean, (dim,))], dim=-1)
        module = self.modules[self.layers.index(stage)]
        if module.fc1.weight.device != x.device:
            self.modules.to(x.device)
        if self.soft:
            return module(features.detach())
        with torch.no_grad():
            return module(features)

    # --- selection -----------------------------------------------------------------------------------
    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, device = visual.num_tokens, visual.features.device
        if n == 0:
            return torch.zeros(visual.num_images, 0, dtype=torch.bool, device=device)
        if self.modules is None:
            budgets, finals = self._fallback_budgets(visual)
            if min(budgets) >= n:
                return torch.arange(n, device=device).expand(visual.num_images, -1)
        elif self.keep == 1.0 and not self.soft:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        data = self._stage(visual)
        rows = visual.context["rows"]
        score = data["score"][rows]  # (I, n)
        if self.modules is None:  # fallback: exactly the scheduled count, the grid first
            on_grid = torch.stack(
                [
                    grid_mask(visual.token_ids[i], visual.grid, fitting_stride(visual.grid, self.stride, final))
                    for i, final in enumerate(finals)
                ]
            )
            if len(set(budgets)) == 1:
                return top_k_sorted(score.masked_fill(on_grid, float("inf")), budgets[0])
            order = torch.sort(score.masked_fill(on_grid, float("inf")), dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand_as(order))
            return rank < torch.tensor(budgets, device=device)[:, None]
        on_grid = grid_mask(visual.token_ids, visual.grid, self.stride)
        theta = data["theta"][visual.image_index][:, None]
        if not self.soft:
            return (score > theta) | on_grid
        mask = torch.sigmoid(self.temperature * (score - theta)).masked_fill(on_grid, 1.0)
        flat = self._bias.reshape(-1)
        log_mask = torch.log(mask.clamp(min=1e-12))
        self._bias = flat.index_add(0, rows.reshape(-1), log_mask.reshape(-1)).view_as(self._bias)
        cumulative = self._bias.reshape(-1)[rows].exp().sum(1)  # (I,) soft kept count
        self._kept.append((visual.stage, visual.image_index, cumulative, n))
        return torch.ones(visual.num_images, n, dtype=torch.bool, device=device)
