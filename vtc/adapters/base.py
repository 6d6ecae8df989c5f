"""What every adapter provides, and the registry that finds the adapter for a model."""

from __future__ import annotations

import torch

from .decoder import SUPPORTED_ATTENTION, PrunedDecoder, VisualLayout


class Adapter:
    """Knows one model family: where the vision tower, projector and decoder are, which tokens are visual,
    and the token grid of each image. Installs hooks and the decoder loop on one *instance*."""

    name: str = ""
    model_classes: tuple[str, ...] = ()

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
