"""vtc inside vLLM: visual-token compression in a serving engine (an out-of-tree vLLM plug-in).

    from vllm import LLM
    import vtc.integrations.vllm as vtc_vllm
    llm = LLM(model=..., hf_overrides=vtc_vllm.overrides("vtc_cls", keep=0.25))

or, for the OpenAI-compatible server, the same JSON on the command line:

    python -m vllm.entrypoints.openai.api_server --model MODEL \
        --hf-overrides '{"vtc": {"strategy": "vtc_cls", "keep": 0.25}}'

How it works (DESIGN.md section 8):
- vLLM loads the entry point `vllm.general_plugins: vtc = vtc.integrations.vllm:register` in every process; it
  registers vtc's subclasses of vLLM's own model classes under their architecture names (lazy "module:Class"
  strings, so nothing is imported until an engine builds such a model). Without a "vtc" key in the engine's
  `hf_overrides` they are an exact pass-through of vLLM's classes.
- The processor side fixes each image's placeholder count from the budget before the model runs, so the prompt
  that vLLM schedules, caches and bills (`prompt_tokens`) is the short one.
- The model side selects in the multimodal-embedding step (`embed_multimodal`) with vtc's own strategy code on
  tensors (`Strategy.select` on `VisualTokens`); vision probes are computed from q/k of vLLM's vision layers by
  the same functions as in `vtc.patch` (vtc/probes.py).
- A request may pass its own budget: `mm_processor_kwargs={"vtc_keep": 0.1}` (the engine's keep is the default).
- Families (`MODELS`): LLaVA-1.5 (vtc/integrations/vllm/llava.py; kept tokens take consecutive 1-D positions),
  Qwen2.5-VL and Qwen2-VL (vtc/integrations/vllm/qwen_vl.py; kept tokens keep their original M-RoPE (t, h, w)
  positions, as in vtc.patch: vtc/integrations/vllm/mrope.py). Any other architecture with a "vtc" key fails at
  engine start (`check_architecture`). Not served yet: LLaVA-NeXT, Qwen3-VL.

This module imports no vLLM: `overrides()` validates with vtc alone, so it runs where vLLM is not installed.
"""

from __future__ import annotations

import json

from ... import strategies as _strategies  # noqa: F401  (registers the strategies)
from ...budget import validate_keep
from ...strategies.base import build_strategy, get_strategy_class

# Strategies served: pre-LLM, text-agnostic, with a budget fixed by the image size (vLLM fixes the placeholder
# count before the model runs, and its encoder cache shares an image's embedding across prompts).
SERVED = ("vtc_cls", "fopru", "visionzip", "hired", "tome", "todre", "random", "downsample")

# Refused, with the reason (the name a user passes is normalised to the strategy's canonical name first).
REFUSED = {
    "atp": "adaptive budget: ATP decides the count per image from its scores, but vLLM fixes the placeholder "
    "count in the processor before the model runs",
    "dyvte": "adaptive budget and in-LLM exits: DyVTE drops all visual tokens at a layer chosen at run time; vLLM "
    "fixes the prompt length and the KV layout before the model runs",
    "quota": "query-conditioned adaptive budget: QuoTA scores frames against the question and gives each its own "
    "count; vLLM fixes counts before the model runs and its encoder embeds images without the text",
    "fastv": "in-LLM pruning: FastV drops tokens inside the decoder at layer K, which needs per-layer sequence "
    "lengths and KV-cache changes in vLLM's engine",
    "dart": "in-LLM pruning: DART drops duplicates inside the decoder at layer K, which needs per-layer sequence "
    "lengths and KV-cache changes in vLLM's engine",
    "pmod": "in-LLM routing: p-MoD routes tokens through decoder layers, which needs engine changes in vLLM",
}

# vLLM architecture name -> the vtc class that replaces it ("module:Class", imported lazily by vLLM).
MODELS = {
    "LlavaForConditionalGeneration": "vtc.integrations.vllm.llava:VtcLlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vtc.integrations.vllm.qwen_vl:VtcQwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "vtc.integrations.vllm.qwen_vl:VtcQwen2VLForConditionalGeneration",
}

KEEP_KWARG = "vtc_keep"  # a request's keep, in its mm_processor_kwargs
STRATEGY_KWARG = "vtc_strategy"  # a request's strategy (with its default options), in its mm_processor_kwargs


def overrides(strategy: str, keep: float | int | None = None, **options) -> dict:
    """The `hf_overrides` that turn vtc on in a vLLM engine: `{"vtc": {"strategy": ..., "keep": ..., **options}}`.

    Validated like `vtc.patch`: an unknown strategy lists the known ones, a bad keep or option fails here, before
    an engine starts. Strategies that vLLM cannot serve (adaptive budgets, in-LLM pruning) are refused with the
    reason. The result is JSON-serialisable: `json.dumps(overrides(...))` is the server's `--hf-overrides`."""
    name = get_strategy_class(strategy).name  # unknown names fail here, listing the known ones
    if name in REFUSED:
        raise ValueError(f"strategy {strategy!r} cannot run inside vLLM: {REFUSED[name]}; served: {', '.join(SERVED)}")
    if name not in SERVED:
        raise ValueError(f"strategy {strategy!r} is not served by vtc's vLLM plug-in yet; served: {', '.join(SERVED)}")
    if name == "todre":
        if options.get("stage2"):
            raise ValueError(
                "todre's stage 2 prunes inside the decoder (in-LLM), which vLLM cannot serve: pass stage2=False"
            )
        options["stage2"] = False  # stage 1 only: the diversity selection before the LLM
    if name == "tome" and options.get("placement", "pre_llm") != "pre_llm":
        raise ValueError("tome(placement='vision') merges inside the vision tower, which the plug-in does not patch")
    if keep is not None:
        validate_keep(keep)
    settings = {"strategy": name, "keep": keep, **options}
    make_strategy(settings)  # bad options fail as in vtc.patch
    json.dumps(settings)  # the server takes this dict as JSON: options must be plain values
    return {"vtc": settings}


class _Host:
    """What a vLLM model class tells a strategy's `check_adapter` (the part of vtc's adapter interface that the
    served strategies read): whether the vision tower has a real [CLS] token."""

    def __init__(self, has_cls: bool):
        self._has_cls = has_cls

    def has_cls(self) -> bool:
        return self._has_cls


def make_strategy(settings: dict, has_cls: bool | None = None):
    """The vtc Strategy of an engine's "vtc" settings (keep None: the strategy's paper default, as in vtc.patch).
    With `has_cls` (the model's vision tower has a [CLS] token, or not), each strategy checks and configures itself
    for the model as at vtc.patch (e.g. VisionZip's contextual rule for towers without [CLS]; HiRED refuses them)."""
    options = dict(settings)
    name, keep = options.pop("strategy"), options.pop("keep", None)
    if keep is None:
        keep = getattr(get_strategy_class(name), "default_keep", 1.0)
    strategy = build_strategy(name, keep, options)
    if has_cls is not None:
        for member in getattr(strategy, "members", [strategy]):
            member.check_adapter(_Host(has_cls))
    return strategy


def request_settings(settings: dict, hf_kwargs) -> dict:
    """A request's settings: the engine's, with the request's mm_processor_kwargs "vtc_strategy" (taken with its
    default options unless it is the engine's strategy) and "vtc_keep" on top; validated like overrides()."""
    strategy, keep = hf_kwargs.get(STRATEGY_KWARG), hf_kwargs.get(KEEP_KWARG)
    if strategy is None and keep is None:
        return settings
    merged = dict(settings)
    if strategy is not None and get_strategy_class(strategy).name != settings["strategy"]:
        merged = {"strategy": strategy, "keep": None}
    if keep is not None:
        merged["keep"] = keep
    return overrides(merged.pop("strategy"), **merged)["vtc"]


def served_budget(strategy, n_tokens: int) -> int:
    """Tokens one image of `n_tokens` keeps under `strategy`: the placeholder count the processor emits."""
    from ...strategies.hired import HiRED, total_budget

    if isinstance(strategy, HiRED):  # one partition (LLaVA-1.5): HiRED's own single-image rule
        return (
            n_tokens
            if strategy._keeps_all(n_tokens)
            else max(1, min(total_budget(strategy.keep, 1, n_tokens), n_tokens))
        )
    return strategy.stage_budget(n_tokens, n_tokens, "pre_llm")


def check_architecture(arch: str, hf_config) -> None:
    """Fail loud when an engine's hf_config carries vtc settings (`hf_overrides={"vtc": ...}`) but vLLM resolved an
    architecture the plug-in does not register: vLLM's own class would ignore the key and serve the full prompt."""
    if getattr(hf_config, "vtc", None) is not None and arch not in MODELS:
        raise ValueError(
            f"hf_overrides has a 'vtc' key, but vtc's vLLM plug-in does not serve architecture {arch!r} (vLLM would "
            f"ignore the key and run the model uncompressed); served architectures: {', '.join(MODELS)}"
        )


def _guarded(inspect):
    """vLLM's `ModelRegistry.inspect_model_cls`, followed by `check_architecture` on what it resolved."""

    def inspect_model_cls(architectures, model_config):
        info, arch = inspect(architectures, model_config)
        check_architecture(arch, model_config.hf_config)
        return info, arch

    inspect_model_cls.vtc_guard = True
    return inspect_model_cls


def register() -> None:
    """The `vllm.general_plugins` entry point: register vtc's model classes with vLLM (lazily, by name), and guard
    the registry instance so that a "vtc" key on an architecture without a vtc class fails when the engine's model
    config resolves its architecture (before any engine starts)."""
    from vllm import ModelRegistry

    for arch, cls in MODELS.items():
        ModelRegistry.register_model(arch, cls)
    if not getattr(ModelRegistry.inspect_model_cls, "vtc_guard", False):  # the instance, not vLLM's class
        ModelRegistry.inspect_model_cls = _guarded(ModelRegistry.inspect_model_cls)
