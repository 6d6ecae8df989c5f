"""p-MoD: Mixture-of-Depths on the visual tokens, with progressive ratio decay (PRD).

Zhang, Wang, Tang, et al., "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay" (2024;
code: github.com/MCG-NJU/p-MoD). Claim: visual tokens grow redundant in deeper layers, so each decoder
layer lets only its top-scored visual tokens through, a share that decays with depth; the others skip the
layer (a residual bypass) and come back for the next one. Nothing is pruned: every visual token reaches
the last layer, but a layer that skips a token neither computes it nor caches its key and value.

As in the official code (llava/model/language_model/pmod_llava_llama.py: `ModLayer`, `TokenRouter`,
`shifted_cos_with_ratio`; scripts/train/finetune_eval_7b_pmod_llava_1_5.sh: `shiftedcos_decay_0.85_0.15`,
`mod_router_factor=0.5`, `tanh_0.2_1`, `mod_bias_enabled`, `mod_special_init`):
- schedule, per layer (not per block): rho_l = 0.5 cos(l pi / (L - 1)) + 0.5; layer l routes iff
  rho_l <= 0.85, with ratio max(rho_l, 0.15). The official code hardcodes L - 1 = 31 (its 32-layer LLMs);
  here L - 1 is the model's own. On 32 layers: layers 8..31 route, mean retention 0.5375;
- per routed layer, a router Linear(d -> 1, bias), initialised to zero, reads the layer's input hidden
  state; the weight is TanhNorm w = 0.2 tanh(r) + 1 (so w = 1 exactly at initialisation);
- per sample, the floor(N rho_l) visual tokens with the largest w (N: the sample's visual tokens, all its
  images together) run through the layer, with the text, at their original positions: x' = x + Attn(x) +
  w * MLP(x + Attn(x)) (STRing: w scales only the MLP branch; the official `forward_return_residual`
  returns the MLP output and the post-attention residual, and the MLP output is multiplied by w);
- the others skip it, scaled: x' = w * x, and are absent from that layer's KV cache.

Our choices:
- `keep` is the mean retention: the fraction of (visual token, decoder layer) pairs computed, averaged over
  all L layers. keep=None (the default) is the paper's schedule (shift 0.5); a float shifts the cosine
  (the paper's `mod_router_factor`, the 0.5 above) to the smallest shift whose mean retention reaches
  `keep` (the floor drops to `keep` when `keep` is below it); keep=1.0 routes no layer (the unpatched model).
  An int keep is refused: a per-image token count has no meaning for layer routing. `ratios={layer: ratio}`
  replaces the schedule.
- the cosine's period: the official `shifted_cos_with_ratio` hard-codes 31 (= L - 1 of its 32-layer LLMs);
  we use the model's own L - 1, so on 32 layers the two schedules are the same and on other depths ours
  still reaches the floor at the last layer (the official one would stop part-way, or pass it).
- top-k over visual tokens only: the official `ModLayer.forward` sets the non-target (text) logits to -inf
  *before* TanhNorm, which maps them to 0.2 tanh(-inf) + 1 = 0.8, the same weight as a visual token whose
  router saturates (tanh(r) = -1 in floating point, r below about -9 in fp32, sooner in fp16/bf16). With
  enough saturated visual tokens, the official `topk` can then return text positions, so the layer computes
  fewer visual tokens than floor(N rho_l) (the text runs anyway). We rank only the visual tokens, so every
  routed layer computes exactly floor(N rho_l) of them; elsewhere the two agree.
- ties (e.g. zero-initialised routers) break towards the earlier token (the official `topk` is unordered).
  Note: the router of the LAST decoder layer gets no gradient from the LM loss (a visual token's output of
  the last layer reaches only its own logits, which carry no label), so it keeps its zero init and picks the
  earliest visual tokens; this holds in the official code too.
- training: the paper fine-tunes the whole MLLM with the routers; `vtc.train(model, "pmod", ...)` trains
  only the routers, with the VLM frozen, on the LM loss of the answers (see `vtc/train/pmod.py`).
- without weights it does not pretend to be p-MoD: it warns at `patch()` and the report says so. The
  training-free fallback keeps the schedule with w = 1 (a skipped token passes unchanged) and routes the
  visual tokens that the last prompt token attends to most at that layer (mean over heads, computed from
  the layer's q and k on its full input, never `output_attentions`), FastV's criterion applied per layer.

Weights: `vtc.train(model, "pmod", data=..., save="pmod.safetensors")`, then
`vtc.patch(model, "pmod", weights="pmod.safetensors")`. Keys `routers.{layer}.weight` (1, d) and
`routers.{layer}.bias` (1,); the official checkpoint's names (`model.layers.{layer}.router.router.weight`)
load too, but its LLM was fine-tuned with them.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .base import Strategy, check_weights_width, read_safetensors, register_strategy

SHIFT, MAX_RATIO, MIN_RATIO = 0.5, 0.85, 0.15  # the paper's shiftedcos_decay_0.85_0.15, mod_router_factor 0.5
TANH_SCALE, TANH_BIAS = 0.2, 1.0  # the paper's tanh_0.2_1
ROUTING_NOTE = (
    "p-MoD routes, it does not prune: 'per layer' counts the visual tokens each layer computed; the others "
    "skipped it (and its KV cache) and every visual token reaches the last layer"
)


def decay(layer: int, num_layers: int, shift: float = SHIFT) -> float:
    """rho_l = 0.5 cos(l pi / (L - 1)) + shift (progressive ratio decay, cosine form)."""
    return 0.5 * math.cos(layer * math.pi / max(num_layers - 1, 1)) + shift


def schedule(
    num_layers: int, shift: float = SHIFT, max_ratio: float = MAX_RATIO, min_ratio: float = MIN_RATIO
) -> dict[int, float]:
    """{layer: retention ratio} of the routed layers: those with rho_l <= max_ratio, floored at min_ratio."""
    out = {}
    for layer in range(num_layers):
        rho = decay(layer, num_layers, shift)
        if rho <= max_ratio:
            out[layer] = min(1.0, max(rho, min_ratio))
    return out


def mean_retention(ratios: dict[int, float], num_layers: int) -> float:
    """Fraction of (visual token, layer) pairs computed: unrouted layers count 1."""
    return (sum(ratios.values()) + num_layers - len(ratios)) / num_layers


def schedule_for_keep(
    keep: float, num_layers: int, max_ratio: float = MAX_RATIO, min_ratio: float = MIN_RATIO
) -> dict[int, float]:
    """The schedule with the smallest cosine shift whose mean retention reaches `keep` (monotone in the shift)."""
    min_ratio = min(min_ratio, keep)
    lo, hi = -2.0, 2.0  # mean retention is min_ratio at lo and 1 at hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_retention(schedule(num_layers, mid, max_ratio, min_ratio), num_layers) >= keep - 1e-12:
            hi = mid
        else:
            lo = mid
    return schedule(num_layers, hi, max_ratio, min_ratio)


def tanh_norm(logits: torch.Tensor) -> torch.Tensor:
    """TanhNorm: w = 0.2 tanh(r) + 1, in (0.8, 1.2)."""
    return TANH_SCALE * torch.tanh(logits) + TANH_BIAS


def make_routers(hidden_size: int, layers: list[int]) -> nn.ModuleDict:
    """One zero-initialised Linear(d -> 1, bias) per routed layer (the official `mod_special_init`)."""
    routers = nn.ModuleDict({str(layer): nn.Linear(hidden_size, 1) for layer in layers})
    for router in routers.values():
        nn.init.zeros_(router.weight)
        nn.init.zeros_(router.bias)
    return routers


_KEYS = (
    re.compile(r"(?:^|\.)routers\.(\d+)\.(weight|bias)$"),
    re.compile(r"(?:^|\.)layers\.(\d+)\.router\.router\.(weight|bias)$"),  # the official checkpoint
)


def load_routers(path: str | Path) -> nn.ModuleDict:
    """Routers from a safetensors file written by `vtc.train` (or with the official checkpoint's key names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pmod weights not found: {str(path)!r} is not a file; train them with "
            f"vtc.train(model, strategy='pmod', data=..., save={str(path)!r}), or pass weights=None for the "
            f"announced training-free fallback (attention-routed, w = 1)"
        )
    state: dict[tuple[int, str], torch.Tensor] = {}
    for key, value in read_safetensors(path, "pmod")[0].items():
        match = next((m for m in (p.search(key) for p in _KEYS) if m), None)
        if match:
            state[(int(match.group(1)), match.group(2))] = value
    layers = sorted({layer for layer, _ in state})
    if not layers or not all((layer, "weight") in state for layer in layers):
        raise ValueError(f"{path} holds no p-MoD routers (keys routers.<layer>.weight / .bias)")
    routers = make_routers(state[(layers[0], "weight")].shape[-1], layers)
    for layer in layers:
        router = routers[str(layer)]
        router.weight.data.copy_(state[(layer, "weight")].float().reshape(router.weight.shape))
        if (layer, "bias") in state:
            router.bias.data.copy_(state[(layer, "bias")].float().reshape(1))
    return routers.eval().requires_grad_(False)


def save_routers(routers: nn.ModuleDict, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {
        f"routers.{layer}.{name}": getattr(router, name).detach().float().cpu().contiguous()
        for layer, router in routers.items()
        for name in ("weight", "bias")
    }
    save_file(state, str(path), metadata={"format": "pt", "strategy": "pmod", "layers": ",".join(routers.keys())})


def top_k_mask(scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: per row, the k[b] eligible entries with the largest scores (ties: the earlier entry)."""
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return eligible & (rank < k[:, None])


@register_strategy
class PMoD(Strategy):
    name = "pmod"
    aliases = ("p_mod", "p-mod")
    stage = "llm"
    paper = "Zhang et al., p-MoD: Mixture-of-Depths MLLMs via Progressive Ratio Decay (MCG-NJU/p-MoD)"
    default_keep = None  # the paper's schedule
    text_queries = "last"

    def __init__(
        self,
        keep: float | None = None,
        weights: str | Path | None = None,
        ratios: dict[int, float] | None = None,
        max_ratio: float = MAX_RATIO,
        min_ratio: float = MIN_RATIO,
    ):
        if isinstance(keep, int) and not isinstance(keep, bool):
            raise ValueError(
                f"pmod: keep={keep} is a token count; p-MoD's keep is the mean fraction of visual tokens each "
                "decoder layer computes: pass a float in (0, 1], or keep=None for the paper's schedule"
            )
        super().__init__(1.0 if keep is None else keep)
        if ratios is not None and any(not 0.0 <= float(r) <= 1.0 for r in ratios.values()):
            raise ValueError(f"pmod ratios={ratios}: each retention ratio must lie in [0, 1]")
        if not 0.0 < min_ratio <= max_ratio <= 1.0:
            raise ValueError(f"pmod: pass 0 < min_ratio <= max_ratio <= 1 (got {min_ratio}, {max_ratio})")
        self.target = keep
        self.weights = weights
        self.fixed_ratios = None if ratios is None else {int(k): float(v) for k, v in ratios.items()}
        self.max_ratio, self.min_ratio = max_ratio, min_ratio
        self.routers: nn.ModuleDict | None = load_routers(weights) if weights is not None else None
        self.ratios: dict[int, float] = {}
        self.notes: list[str] = [ROUTING_NOTE]
        if self.routers is None:
            self._announce()

    @classmethod
    def with_routers(
        cls, routers: nn.ModuleDict, keep: float | None = None, ratios: dict[int, float] | None = None
    ) -> PMoD:
        """A PMoD using these (e.g. freshly made, being trained) routers; no fallback, no warning."""
        self = cls.__new__(cls)
        Strategy.__init__(self, 1.0 if keep is None else keep)
        self.target, self.weights = keep, None
        self.fixed_ratios = None if ratios is None else {int(k): float(v) for k, v in ratios.items()}
        self.max_ratio, self.min_ratio = MAX_RATIO, MIN_RATIO
        self.routers, self.ratios = routers, {}
        self.notes = [ROUTING_NOTE]
        return self

    def _announce(self) -> None:
        message = (
            "pmod without trained router weights: NOT the paper's learned routing, a training-free fallback: "
            "under the same schedule each routed layer computes the visual tokens the last prompt token "
            "attends to most at that layer, with w = 1. Train routers with "
            "vtc.train(model, strategy='pmod', data=..., save=path) and pass weights=path"
        )
        warnings.warn(message, UserWarning, stacklevel=5)  # the caller of vtc.patch
        self.notes.append(message)

    def check_adapter(self, adapter) -> None:
        if self.routers is not None:
            width = next(iter(self.routers.values())).weight.shape[-1]
            check_weights_width("pmod", self.weights, width, adapter.language_model.config.hidden_size)

    # --- the layer-routing hook (see vtc/adapters/decoder.py) ----------------------------------------
    @property
    def route_probe(self) -> bool:
        """The decoder computes the text-to-visual attention rows of each routed layer (fallback only)."""
        return self.routers is None

    def layer_ratios(self, num_layers: int) -> dict[int, float]:
        if self.fixed_ratios is not None:
            return dict(self.fixed_ratios)
        if self.target is None:
            return schedule(num_layers, SHIFT, self.max_ratio, self.min_ratio)
        return schedule_for_keep(float(self.target), num_layers, self.max_ratio, self.min_ratio)

    def prune_layers(self, num_layers: int) -> list[int]:
        """p-MoD drops no token; this only checks (at patch time) that the schedule fits the model."""
        self.route_layers(num_layers)
        return []

    def route_layers(self, num_layers: int) -> list[int]:
        self.ratios = self.layer_ratios(num_layers)
        bad = [layer for layer in self.ratios if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"pmod ratios name layers {bad}, but the language model has {num_layers} layers")
        if self.routers is not None:
            missing = sorted(set(self.ratios) - {int(k) for k in self.routers.keys()})
            if missing:
                raise ValueError(
                    f"pmod weights have no router for routed layers {missing} (this keep / model): train weights "
                    f"for this schedule with vtc.train(model, strategy='pmod', ...), or use the schedule they "
                    f"were trained with"
                )
        return sorted(self.ratios)

    def route(self, layer: int, context: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(run (B, L) bool: the visual tokens computed by `layer`, weights (B, L) w or None for w = 1)."""
        seq = context["sequence"]
        is_vis = (seq.vis_index >= 0) & seq.valid
        k = (is_vis.sum(1).double() * self.ratios[layer]).floor().long()
        if self.routers is None:
            flat = context["probe"]["text_attention"]
            scores = flat[seq.vis_index.clamp(min=0)]
            return top_k_mask(scores, is_vis, k), None
        router = self.routers[str(layer)]
        if router.weight.device != seq.hidden.device:
            self.routers.to(seq.hidden.device)
        weights = tanh_norm(router(seq.hidden.float()).squeeze(-1))
        return top_k_mask(weights.detach(), is_vis, k), weights

    def describe(self) -> str:
        what = (
            "paper schedule"
            if self.target is None and self.fixed_ratios is None
            else (f"ratios={self.fixed_ratios}" if self.fixed_ratios is not None else f"mean retention {self.target}")
        )
        if self.routers is None:
            return f"pmod(FALLBACK: attention-routed, w=1, {what}, no weights)"
        return f"pmod(routers{'=' + str(self.weights) if self.weights else ''}, {what})"
