"""What every adapter provides, and the registry that finds the adapter for a model."""

from __future__ import annotations

import torch

from .decoder import SUPPORTED_ATTENTION, PrunedDecoder, VisualLayout


class Adapter:
    """Knows one model family: where the vision tower, projector and decoder are, which tokens are visual,
    and the token grid of each image. Installs hooks and the decoder loop on one *instance*."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    vision_merge: bool = False  # runs token merging inside the vision tower (ToMe placement="vision")

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._hooks: list = []
        self._pending_visual: torch.Tensor | None = None
        self._probes: dict[str, dict[int, torch.Tensor]] = {}
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
        implementation = self.language_model.config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise NotImplementedError(
                f"the language model uses attn_implementation={implementation!r}; vtc's decoder loop supports "
                f"{', '.join(SUPPORTED_ATTENTION)}: load the model with attn_implementation='sdpa'"
            )
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
        self.install_capture(handle)
        self._hooks.append(self.model.register_forward_pre_hook(_refuse_labels, with_kwargs=True))
        lm.forward = self.decoder.forward  # instance attribute: the class is untouched

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        lm = self.language_model
        if "forward" in vars(lm):
            del lm.forward
        self.decoder = None
        self._pending_visual = None
        self._probes = {}

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
        n_images = len(layout.counts)
        for kind, by_layer in self._probes.items():
            for layer, value in by_layer.items():
                if value.shape[0] != n_images:
                    raise RuntimeError(
                        f"the {kind} probe at vision layer {layer} saw {value.shape[0]} images but the prompt "
                        f"has {n_images}: run the vision tower and the language model in one call"
                    )
        return self._probes


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


def _refuse_labels(module, args, kwargs) -> None:
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
