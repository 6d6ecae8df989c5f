"""The strategy interface and the registry of strategies.

A strategy is a small object that says at which stage it works and which probes it needs, and turns
scores into selections. It never touches model internals: adapters do (see DESIGN.md, section 3).

- Pre-LLM strategies (`stage = "pre_llm"`) see every image's projected features and the vision probes
  (e.g. the [CLS] attention row at some vision layers) and return, per image, the sorted indices kept.
- In-LLM strategies (`stage = "llm"`) name a decoder layer `llm_layer`; the adapter runs the layers
  before it on the full sequence, computes the text-to-visual attention rows at layer `llm_layer - 1`
  from q and k (never `output_attentions`), and drops the visual tokens the strategy does not select
  before layer `llm_layer`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..budget import tokens_to_keep, validate_keep


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last valid token: the last prompt token under left padding and under right padding."""
    length = valid.shape[1]
    return length - 1 - valid.flip(1).long().argmax(dim=1)


@dataclass
class VisualTokens:
    """The visual tokens of a group of images that share one token grid.

    features: (I, N, D) the tokens as they enter (or flow through) the LLM.
    grid: (rows, cols) of the token grid, rows * cols == N (raster order).
    budget: tokens to keep per image.
    cls_attention: vision layer -> (I, heads, N) attention of the [CLS] query to each visual token
        (softmax over all keys of that layer, [CLS] included; the [CLS] column itself is not in N).
    received_attention: vision layer -> (I, heads, N) attention each visual token receives, averaged
        over the patch queries (the [CLS] query excluded) at that layer.
    vision: every vision probe the strategy asked for, by kind then layer, (I, C, N) each (the two above
        included; e.g. "keys": the layer's keys averaged over heads, (I, head_dim, N)).
    text_attention: (I, Q, N) attention of the chosen text queries to each visual token, averaged over
        heads (in-LLM strategies only), softmax over the whole causal row.
    image_index: (I,) global index of each image in the batch (order of appearance).
    token_ids: (I, N) each token's index in its image's raster grid (in-LLM stages see survivors only).
    stage: "pre_llm", or the decoder layer index before which the selection applies.
    context: what the adapter has besides (the current sequence, the LLM probe of the layer before,
        each image's sample, the layout, every unit's vision probes as `vision`), for strategies that need
        more than the above (e.g. DART's text pivots, HiRED's crop budgets from the base image).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    budget: int
    cls_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    received_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    vision: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    text_attention: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    stage: str | int = "pre_llm"
    context: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


class Strategy:
    """Base class. Subclasses set `name`, `stage` and implement `score` (or override `select`)."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    stage: ClassVar[str] = "pre_llm"  # "pre_llm" or "llm"
    paper: ClassVar[str] = ""
    video_only: ClassVar[bool] = False  # True: prunes video frames only and refuses image prompts (EVS)

    def __init__(self, keep: float | int = 1.0):
        validate_keep(keep)
        self.keep = keep

    # --- what the strategy needs from the model --------------------------------------------------
    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        """Vision probes this strategy reads: {"cls": layers, "received": layers} (0-based encoder layers).

        `feature_layer` is the 0-based encoder layer whose output the LLM receives (LLaVA-1.5: 22 of 24)."""
        return {}

    llm_layer: int | None = None  # in-LLM strategies: decoder layer before which tokens are dropped
    text_queries: str = "last"  # in-LLM: "last" prompt token or mean over all "text" tokens

    def describe(self) -> str:
        return self.name

    def check_adapter(self, adapter) -> None:
        """Fail at patch(), naming the fix, when this model cannot run the strategy (the adapter has already
        checked layers and probes); the default accepts every adapter."""

    needs_keys: bool = False  # in-LLM: the probe also returns the layer's keys and input hidden states

    @property
    def has_pre_llm(self) -> bool:
        return self.stage == "pre_llm"

    def prune_layers(self, num_layers: int) -> list[int]:
        """Decoder layers before which this strategy drops visual tokens."""
        return [self.llm_layer] if self.stage == "llm" else []

    # --- selection ------------------------------------------------------------------------------
    def budget(self, n_tokens: int) -> int:
        return tokens_to_keep(self.keep, n_tokens)

    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        """Tokens an image keeps at `stage`: a float keep is a fraction of the tokens still alive there
        (all of them for a strategy used alone), an int keep a count (at most those alive)."""
        return tokens_to_keep(self.keep, n_alive) if not isinstance(self.keep, int) else min(self.keep, n_alive)

    def score(self, visual: VisualTokens) -> torch.Tensor:
        """(I, N) importance of each visual token; the top `budget` are kept."""
        raise NotImplementedError

    def select(self, visual: VisualTokens) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(I, k) sorted indices into each image's current tokens, kept in their order; or a pair
        (indices, merged features (I, k, D)) for strategies that merge what they drop into what they keep;
        or a bool keep-mask (I, N) when the images of one call keep different counts (e.g. DyVTE's exits),
        optionally with merged features (I, N, D) whose rows at kept tokens replace them (QuoTA)."""
        if visual.budget >= visual.num_tokens:
            return torch.arange(visual.num_tokens, device=visual.features.device).expand(visual.num_images, -1)
        return top_k_sorted(self.score(visual), visual.budget)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, returned in increasing (original) order.

    Ties break towards the lower index, so the result does not depend on the sort implementation."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


class NoneStrategy(Strategy):
    """Keeps every token: the patched model computes exactly what the unpatched one does."""

    name = "none"
    aliases = ("identity",)

    def select(self, visual: VisualTokens) -> torch.Tensor:
        return torch.arange(visual.num_tokens, device=visual.features.device).expand(visual.num_images, -1)


_REGISTRY: dict[str, type[Strategy]] = {}


def _normal(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Register a Strategy subclass under its `name` and `aliases` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or not cls.name:
        raise TypeError("register_strategy takes a Strategy subclass with a non-empty `name`")
    for key in (cls.name, *cls.aliases):
        existing = _REGISTRY.get(_normal(key))
        if existing is not None and existing is not cls:
            raise ValueError(f"strategy name {key!r} is already registered by {existing.__name__}")
        _REGISTRY[_normal(key)] = cls
    return cls


def list_strategies() -> list[str]:
    """Canonical names of the registered strategies."""
    return sorted({cls.name for cls in _REGISTRY.values()})


def prunes_images(name: str) -> bool:
    """Whether the strategy `name` prunes images (False for the video-only ones, which refuse image prompts)."""
    return not get_strategy_class(name).video_only


def get_strategy_class(name: str) -> type[Strategy]:
    cls = _REGISTRY.get(_normal(name)) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(list_strategies())}")
    return cls


class Composed(Strategy):
    """A chain of strategies at different stages, e.g. ["visionzip", "fastv"]: a pre-LLM selection, then
    in-LLM pruning of what is left. Each member keeps its own budget; the report shows every stage."""

    name = "composed"

    def __init__(self, members: list[Strategy]):
        self.members = members
        self.keep = members[0].keep
        pre = [m for m in members if m.has_pre_llm]
        if len(pre) > 1:
            raise ValueError("a composition takes at most one pre-LLM strategy: " + ", ".join(m.name for m in pre))
        self.pre = pre[0] if pre else None
        self.by_layer: dict[int, Strategy] = {}  # filled by prune_layers (pre-LLM members may prune in-LLM too)
        in_llm = [m for m in members if m.stage == "llm"] or members
        self.text_queries = in_llm[0].text_queries
        self.needs_keys = any(m.needs_keys for m in members)
        self.notes = [n for m in members for n in getattr(m, "notes", [])]

    @property
    def stage(self) -> str:
        return "pre_llm" if self.pre else "llm"

    @property
    def has_pre_llm(self) -> bool:
        return self.pre is not None

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        merged: dict[str, list[int]] = {}
        for m in self.members:
            for kind, layers in m.vision_probes(num_layers, feature_layer).items():
                merged[kind] = sorted(set(merged.get(kind, [])) | set(layers))
        return merged

    def member_for(self, stage: str | int) -> Strategy:
        if stage == "pre_llm":
            return self.pre
        return self.by_layer[stage]

    def prune_layers(self, num_layers: int) -> list[int]:
        layers = [(layer, m) for m in self.members for layer in m.prune_layers(num_layers)]
        self.by_layer = dict(layers)
        if len(self.by_layer) != len(layers):
            raise ValueError(
                f"the strategies of this composition prune at the same layer: {sorted(x for x, _ in layers)}"
            )
        return sorted(self.by_layer)

    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        return self.member_for(stage).stage_budget(n_original, n_alive, stage)

    def select(self, visual: VisualTokens):
        return self.member_for(visual.stage).select(visual)

    def describe(self) -> str:
        return " + ".join(m.describe() for m in self.members)


def build_strategy(strategy, keep: float | int, options: dict, processor=None) -> Strategy:
    """A Strategy from a name, an instance, or a list of them (a composition, first member gets `keep`).

    `processor` (the model's) goes to the strategies whose constructor takes one (QuoTA); the others ignore it."""
    if isinstance(strategy, (list, tuple)):
        members = []
        for i, member in enumerate(strategy):
            name, member_options = _composition_member(member)
            if i == 0:
                member_options = {**options, **member_options}
                members.append(build_strategy(name, member_options.pop("keep", keep), member_options, processor))
            else:
                member_keep = member_options.pop("keep", None)
                if member_keep is None and not isinstance(name, Strategy):
                    member_keep = getattr(get_strategy_class(name), "default_keep", 1.0)
                members.append(build_strategy(name, member_keep, member_options, processor))
        return Composed(members)
    if isinstance(strategy, Strategy):
        if options:
            raise TypeError("pass options to the Strategy constructor, not to patch(), when giving an instance")
        return strategy
    cls = get_strategy_class("none" if strategy is None else strategy)
    _check_layer_options(cls.name, options)
    import inspect

    if processor is not None and "processor" in inspect.signature(cls.__init__).parameters:
        options = {"processor": processor, **options}
    try:
        return cls(keep=keep, **options)
    except TypeError as err:
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "keep")]
        raise TypeError(f"{err}; options of strategy {cls.name!r}: {', '.join(params) or 'none'}") from None


def read_safetensors(path, strategy: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a strategy's weight file; a file that is not a readable safetensors file fails
    with a message naming it (safetensors' own error names no file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{strategy} weights {str(path)!r} are not a readable safetensors file ({err}): write them again with "
            f"vtc.train(model, strategy={strategy!r}, data=..., save=path)"
        ) from None


def check_weights_width(strategy: str, path, width: int, model_width: int) -> None:
    """Fail at patch() when a strategy's weights were trained for a language model of another hidden size."""
    if width != model_width:
        source = f"weights {str(path)!r}" if path else "weights"
        raise ValueError(
            f"{strategy} {source} were trained for a language model with hidden size {width}, this "
            f"one has {model_width}: train weights for this model with vtc.train(model, strategy={strategy!r}, ...)"
        )


def _composition_member(member) -> tuple:
    """(name or Strategy, options dict) of one member of a composition list, or a TypeError naming the forms."""
    if isinstance(member, (str, Strategy)):
        return member, {}
    if isinstance(member, tuple) and len(member) == 2 and isinstance(member[1], dict):
        return member[0], dict(member[1])
    raise TypeError(
        f"composition member {member!r}: pass a strategy name, a Strategy instance, or a pair "
        f"(name, {{option: value}}), e.g. ('fastv', {{'keep': 0.5, 'layer': 3}})"
    )


def _check_layer_options(strategy: str, options: dict) -> None:
    """Layer options (`layer`, `*_layer`, `layers`) take ints: True would silently mean layer 1, 2.7 layer 2."""
    for key, value in options.items():
        if key != "layer" and not key.endswith("_layer") and key != "layers":
            continue
        values = value if key == "layers" and isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise TypeError(f"strategy {strategy!r}: {key}={value!r}; a layer is an int index, e.g. {key}=2")


register_strategy(NoneStrategy)
