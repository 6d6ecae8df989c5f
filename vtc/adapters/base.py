"""What every adapter provides, and the registry that finds the adapter for a model."""

from __future__ import annotations

import functools

import torch

from ..local import PerThread
from .decoder import PrunedDecoder, VisualLayout, check_attention


class Adapter:
    """Knows one model family: where the vision tower, projector and decoder are, which tokens are visual,
    and the token grid of each image. Installs hooks and the decoder loop on one *instance*."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    vision_merge: bool = False  # runs token merging inside the vision tower (ToMe placement="vision")
    vision_records: bool = False  # lays out the visual tokens from what the vision tower's run recorded
    # what one call captures is per thread: two threads sharing the model never see each other's
    _pending_visual = PerThread(None)  # (B, L) bool: the visual tokens of this thread's current forward
    _probes = PerThread({})  # kind -> vision layer -> (units, channels, tokens)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._hooks: list = []
        self._wrapped_model: list[str] = []
        self.decoder: PrunedDecoder | None = None

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # --- to implement per family ----------------------------------------------------------------
    @property
    def inner(self) -> torch.nn.Module:
        """The multimodal base model (`model.model` in transformers' VLM classes)."""
        return self.model.model

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder whose instance forward vtc replaces."""
        return self.inner.language_model

    def tokens_per_image(self) -> int | None:
        """Visual tokens of one image when fixed (LLaVA-1.5: 576), else None."""
        return None

    def num_vision_layers(self) -> int:
        raise NotImplementedError

    def feature_layer(self) -> int:
        """0-based vision encoder layer whose output feeds the projector."""
        raise NotImplementedError

    def install_capture(self, handle) -> None:
        """Register the hooks that capture the visual-token mask and the vision probes."""
        raise NotImplementedError

    def visual_layout(self, visual: torch.Tensor, n_visual: int) -> VisualLayout:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    def check(self, strategy) -> None:
        """Fail early, naming the fix, for what this adapter cannot run."""
        check_attention(self.language_model.config)
        n_llm = self.language_model.config.num_hidden_layers
        for layer in strategy.prune_layers(n_llm):
            if not 1 <= layer < n_llm:
                raise ValueError(
                    f"strategy {strategy.name!r} prunes before decoder layer {layer}, but the "
                    f"language model has {n_llm} layers: pass a layer in [1, {n_llm - 1}]"
                )
        for member in getattr(strategy, "members", [strategy]):  # what only the strategy knows it needs
            member.check_adapter(self)
        for kind, layers in strategy.vision_probes(self.num_vision_layers(), self.feature_layer()).items():
            for layer in layers:
                if not 0 <= layer < self.num_vision_layers():
                    raise ValueError(
                        f"strategy {strategy.name!r} reads {kind} attention at vision layer {layer}, but the "
                        f"vision tower has {self.num_vision_layers()} layers"
                    )

    def install(self, handle) -> None:
        lm = self.language_model
        self.decoder = PrunedDecoder(handle, lm, lm.forward)
        # every call re-checks the attention implementation and refuses labels before anything runs

        def check_call(module, args, kwargs) -> None:
            check_attention(lm.config)
            _refuse_labels(kwargs)

        self._hooks.append(self.model.register_forward_pre_hook(check_call, with_kwargs=True))
        self.install_capture(handle)
        if hasattr(self.model, "generate"):
            self._wrap_model("generate", functools.partial(_generate, handle))
            self._wrap_model("_expand_inputs_for_generation", functools.partial(_expand_inputs, handle))
        lm.forward = self.decoder.forward  # instance attribute: the class is untouched

    def _wrap_model(self, name: str, wrapper) -> None:
        """Instance attribute over a method of the model (the class is untouched); it keeps the signature."""
        original = getattr(self.model, name)
        setattr(self.model, name, functools.wraps(original)(functools.partial(wrapper, original)))
        self._wrapped_model.append(name)

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name in self._wrapped_model:
            if name in vars(self.model):
                delattr(self.model, name)
        self._wrapped_model.clear()
        lm = self.language_model
        if "forward" in vars(lm):
            del lm.forward
        self.decoder = None
        self._pending_visual = None
        self._probes = {}

    def needs_own_vision(self, strategy) -> bool:
        """Whether a forward needs this model's own vision tower to run under vtc's hooks (not outside features)."""
        return self.vision_records or bool(strategy.vision_probes(self.num_vision_layers(), self.feature_layer()))

    def collapse_rows(self, k: int) -> None:
        """generate() repeated every sample k times (beams): keep one copy of each row of what this forward's hooks
        captured per row, as the prefill runs on one copy (`PrunedDecoder._collapsed_prefill`)."""
        if self._pending_visual is not None:
            self._pending_visual = self._pending_visual[::k]

    def has_cls(self) -> bool:
        """Whether the vision tower has a real [CLS] token (adapters whose towers do say so)."""
        return False

    def after_decoder_layer(self, layer: int, seq) -> torch.Tensor | None:
        """Prefill hook of the decoder loop, called after decoder layer `layer` with the current `Sequence`
        (hidden, positions, valid, vis_index: each row's flat visual-token index, -1 for text; dropped tokens
        are gone). Returns the hidden states to continue with, or None to leave them (the default). Qwen3-VL
        adds its DeepStack features to the visual tokens that are still there."""
        return None

    def take_visual_mask(self) -> torch.Tensor | None:
        visual, self._pending_visual = self._pending_visual, None
        return visual

    def vision_probes(self, layout: VisualLayout) -> dict[str, dict[int, torch.Tensor]]:
        wanted = self.decoder.handle.strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        for kind, layers in wanted.items():
            missing = [layer for layer in layers if layer not in self._probes.get(kind, {})]
            if missing:
                raise RuntimeError(
                    f"the {kind} probe at vision layers {missing} was not captured: the vision tower did not run under "
                    "vtc's hooks in this call; pass pixel values to the patched model (or use generate())"
                )
        n_images = len(layout.counts)
        for kind, by_layer in self._probes.items():
            for layer, value in by_layer.items():
                if value.shape[0] != n_images:
                    raise RuntimeError(
                        f"the {kind} probe at vision layer {layer} saw {value.shape[0]} images but the prompt "
                        f"has {n_images}: run the vision tower and the language model in one call"
                    )
        return self._probes


def _generate(handle, original, *args, **kwargs):
    """The patched model's generate(): refuses what vtc cannot run before anything runs, and records this thread's
    call (the prompt length; the batch expansion, set by `_expand_inputs`) for the decoder loop."""
    check_attention(handle.adapter.language_model.config)
    config = kwargs.get("generation_config")
    config = config if config is not None else handle.model.generation_config
    static = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if static is not None and static != "dynamic":
        raise NotImplementedError(
            f"generate(cache_implementation={static!r}) on a vtc-patched model: a pruned prefill caches fewer entries "
            "than the prompt and different counts per layer, which a fixed-shape cache cannot hold; drop "
            "cache_implementation (the default dynamic cache works)"
        )
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        if handle.kv_policy is not None:
            raise NotImplementedError(
                "assisted decoding with a vtc KV policy: the policy's eviction cannot be undone when candidates are "
                "rejected; patch without kv= for assisted decoding"
            )
    if kwargs.get("mm_encoder_outputs") and not any(k.startswith("pixel_values") for k in kwargs):
        if handle.adapter.needs_own_vision(handle.strategy):
            way_out = "" if handle.adapter.vision_records else " (or patch it with a strategy without vision probes)"
            raise NotImplementedError(
                f"{type(handle.model).__name__} patched with {handle.strategy.name!r} got vision features computed "
                "elsewhere (mm_encoder_outputs; a patched assistant_model gets the main model's), so its own vision "
                "tower does not run and vtc cannot lay out or probe the visual tokens: pass pixel values, or leave "
                f"the assistant unpatched{way_out}"
            )
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    previous = handle._call
    handle._call = {"expand": 1, "prompt": ids.shape[1] if ids is not None and ids.dim() == 2 else None}
    try:
        return original(*args, **kwargs)
    finally:
        handle._call = previous


def _expand_inputs(handle, original, *args, **kwargs):
    """generate()'s batch expansion for beams / num_return_sequences: recorded for the prefill that follows."""
    expand = kwargs.get("expand_size", args[0] if args else 1)
    if expand > 1 and handle.kv_policy is not None:
        raise NotImplementedError(
            f"generate() with num_beams or num_return_sequences = {expand} and a vtc KV policy: the policy keeps "
            "per-row eviction state that beam reordering does not follow; patch without kv= for beam search"
        )
    if handle._call is not None:
        handle._call["expand"] = expand
    return original(*args, **kwargs)


class CapturedUnits:
    """Mixin for adapters that record, while the vision tower runs, the prompt's units (`self._layout`: LLaVA-NeXT
    base images, crops and frames, InternVL tiles) and the probes per unit (`self._unit_probes`); the prefill
    reads them back, checked. `unit_names` says what the units are in the error messages."""

    unit_names = "unit"

    def visual_layout(self, visual: torch.Tensor, n_visual: int) -> VisualLayout:
        layout = self._layout
        if layout is None or sum(layout.counts) != n_visual:
            raise RuntimeError("the visual tokens of this forward were not captured: call the whole model")
        self.last_layout = layout
        return layout

    def vision_probes(self, layout: VisualLayout) -> dict[str, dict[int, torch.Tensor]]:
        wanted = self.decoder.handle.strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        for kind, layers in wanted.items():
            missing = [layer for layer in layers if layer not in self._unit_probes.get(kind, {})]
            if missing:
                raise RuntimeError(
                    f"the {kind} probe at vision layers {missing} was not captured for every {self.unit_names} of "
                    "this forward: run the vision tower and the language model in one call"
                )
        self._probes = self._unit_probes
        return super().vision_probes(layout)


def _refuse_labels(kwargs: dict) -> None:
    if kwargs.get("labels") is not None:
        raise ValueError(
            "labels= is not supported on a model patched by vtc: its logits cover the compacted sequence (dropped "
            "visual tokens have no row), so they no longer line up with the labels. Compute the loss on the "
            "unpatched model (vtc.unpatch(model) or `with vtc.patched(...)` around inference only); vtc.train "
            "trains a strategy's own weights"
        )


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append(cls)
    return cls


def supported_models() -> list[str]:
    return sorted({name for cls in _ADAPTERS for name in cls.model_classes})


def find_adapter(model: torch.nn.Module) -> Adapter:
    for cls in _ADAPTERS:
        if cls.supports(model):
            return cls(model)
    raise TypeError(
        f"vtc has no adapter for {type(model).__name__}; supported model classes: {', '.join(supported_models())}"
    )
