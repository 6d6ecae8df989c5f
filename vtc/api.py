"""`vtc.patch`: find the adapter, build the strategy, install on the instance, return a PatchHandle."""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch

from . import adapters as _adapters  # noqa: F401  (registers the adapters)
from . import strategies as _strategies  # noqa: F401  (registers the strategies)
from .adapters.base import find_adapter
from .budget import prefill_flops, validate_keep
from .kv.base import KVPolicy, build_policy
from .local import PerThread
from .strategies.base import Strategy, build_strategy

_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class SampleReport:
    """What one sample of the last forward went through."""

    visual_in: int
    visual_after_pre_llm: int
    visual_per_layer: list[int]
    tokens_per_layer: list[int]
    flops: float
    flops_unpatched: float
    images: list[int]

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_unpatched if self.flops_unpatched else 1.0


class Report:
    """Per sample: visual tokens in, kept before the LLM, at every decoder layer, and LLM prefill FLOPs.

    `str(report)` is a table; `report.samples` holds the numbers; `report.to_dict()` serialises them."""

    def __init__(self, strategy: str, samples: list[SampleReport], notes: list[str], kv=None):
        self.strategy = strategy
        self.samples = samples
        self.notes = notes
        self.kv = kv  # a vtc.kv.KVReport when a KV policy is installed

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "notes": list(self.notes),
            "samples": [dict(vars(s), flops_ratio=s.flops_ratio) for s in self.samples],
            "kv": self.kv.to_dict() if self.kv is not None else None,
        }

    def __str__(self) -> str:
        head = f"{'sample':>6} {'images':>6} {'visual in':>9} {'pre-LLM':>8} {'last layer':>10} {'FLOPs':>7}  per layer"
        lines = [f"vtc report: strategy={self.strategy}", head, "-" * len(head)]
        for i, s in enumerate(self.samples):
            per_layer = _run_lengths(s.visual_per_layer)
            lines.append(
                f"{i:>6} {len(s.images):>6} {s.visual_in:>9} {s.visual_after_pre_llm:>8} "
                f"{s.visual_per_layer[-1] if s.visual_per_layer else 0:>10} {s.flops_ratio:>6.1%}  {per_layer}"
            )
        lines += [f"note: {n}" for n in self.notes]
        lines.append("FLOPs = estimated LLM prefill FLOPs relative to the unpatched model (vision tower excluded)")
        if self.kv is not None:
            lines += self.kv.lines()
        return "\n".join(lines)

    __repr__ = __str__


def _run_lengths(values: list[int]) -> str:
    """'576 x2, 288 x30' for a per-layer count list."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out.append(f"{values[i]} x{j - i}")
        i = j
    return ", ".join(out)


class PatchHandle:
    """Returned by `vtc.patch`. Holds the strategy and the record of the last forward; `unpatch()` undoes it.

    After patching, a forward returns logits for the *compacted* sequence: dropped visual tokens have no
    output row (text positions keep their order; samples of a batch are left-padded to the longest).

    `report()` and `last_kept()` describe the calling thread's last forward (each thread has its own); after a
    generate() with num_beams / num_return_sequences they list each input sample once (its copies share its
    selection)."""

    _last = PerThread(None)  # the record of this thread's last prefill
    _call = PerThread(None)  # this thread's running generate() call: {"expand": copies per sample, "prompt": length}

    def __init__(self, model: torch.nn.Module, adapter, strategy: Strategy):
        self.model = model
        self.adapter = adapter
        self.strategy = strategy
        self.reuse_selection = False
        self.kv_policy = None

    # --- public ---------------------------------------------------------------------------------
    def unpatch(self) -> None:
        """Restore the model exactly: hooks removed, the language model's own forward back."""
        if _ACTIVE.get(self.model) is self:
            self.adapter.uninstall()
            _remove_copy_guards(self.model)
            del _ACTIVE[self.model]

    @property
    def active(self) -> bool:
        return _ACTIVE.get(self.model) is self

    def last_kept(self, stage: str = "final") -> list[torch.Tensor]:
        """Per sample of the last forward, sorted indices into that sample's visual tokens (its images'
        tokens concatenated in order) that entered the LLM (`stage="pre_llm"`) or reached the last decoder
        layer (`stage="final"`, the default)."""
        if stage not in ("final", "pre_llm"):
            raise ValueError("stage must be 'final' or 'pre_llm'")
        return [k.clone() for k in self._require_last()["kept"][stage]]

    def report(self) -> Report:
        """Tokens kept per sample and layer, and the estimated prefill FLOPs vs the unpatched model."""
        last = self._require_last()
        kv = self.kv_policy.report() if self.kv_policy is not None else None
        return Report(self.strategy.describe(), last["samples"], last["notes"], kv)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "unpatched"
        kv = f", kv={self.kv_policy.describe()}" if self.kv_policy is not None else ""
        return f"PatchHandle({type(self.model).__name__}, strategy={self.strategy.describe()}{kv}, {state})"

    # --- called by the decoder loop -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _require_last(self) -> dict:
        if self._last is None:
            raise RuntimeError("no forward has run on the patched model yet")
        return self._last

    def _frozen_selection(self, stage, image_ids: list[int], token_ids: torch.Tensor):
        """With `reuse_selection`, the last forward's choice at this stage: (indices into token_ids, merged
        features or None); (None, None) when there is none to reuse."""
        if not self.reuse_selection or self._last is None:
            return None, None
        previous = self._last["selections"].get(stage)
        if previous is None or any(i not in previous for i in image_ids):
            return None, None
        chosen = torch.stack([previous[i][0].to(token_ids.device) for i in image_ids])
        merged = [previous[i][1] for i in image_ids]
        merged = torch.stack(merged) if all(m is not None for m in merged) else None
        return torch.searchsorted(token_ids, chosen), merged

    def _record_text_only(self, batch: int) -> None:
        self._last = {
            "kept": {
                "final": [torch.empty(0, dtype=torch.long)] * batch,
                "pre_llm": [torch.empty(0, dtype=torch.long)] * batch,
            },
            "samples": [],
            "notes": [
                "text-only input: nothing to prune, the model ran unpatched"
                if self.kv_policy is None
                else "text-only input: no visual tokens to prune; the KV policy ran"
            ],
            "selections": {},
        }

    def _record_prefill(self, layout, segments, n_layers: int, selections: dict) -> None:
        config = self.adapter.language_model.config
        batch = segments[0].valid.shape[0]
        starts, images_of = [0] * batch, [[] for _ in range(batch)]
        offset = 0
        for image, (count, sample) in enumerate(zip(layout.counts, layout.sample_of_image)):
            if not images_of[sample]:
                starts[sample] = offset
            images_of[sample].append(image)
            offset += count
        visual_in = [sum(layout.counts[i] for i in images_of[b]) for b in range(batch)]

        def kept(seg, b):
            idx = seg.vis_index[b][(seg.vis_index[b] >= 0) & seg.valid[b]]
            return (idx - starts[b]).sort().values.cpu()

        counts = [((s.vis_index >= 0) & s.valid).sum(1).tolist() for s in segments]
        totals = [s.valid.sum(1).tolist() for s in segments]
        layer_seg = [max(j for j, s in enumerate(segments) if s.start_layer <= layer) for layer in range(n_layers)]
        samples = []
        for b in range(batch):
            tokens = [totals[layer_seg[layer]][b] for layer in range(n_layers)]
            full = totals[0][b] + visual_in[b] - counts[0][b]
            samples.append(
                SampleReport(
                    visual_in=visual_in[b],
                    visual_after_pre_llm=counts[0][b],
                    visual_per_layer=[counts[layer_seg[layer]][b] for layer in range(n_layers)],
                    tokens_per_layer=tokens,
                    flops=prefill_flops(config, tokens),
                    flops_unpatched=prefill_flops(config, [full] * n_layers),
                    images=images_of[b],
                )
            )
        self._last = {
            "kept": {
                "pre_llm": [kept(segments[0], b) for b in range(batch)],
                "final": [kept(segments[-1], b) for b in range(batch)],
            },
            "samples": samples,
            "notes": list(getattr(self.strategy, "notes", [])) + list(getattr(self.adapter, "notes", [])),
            "selections": selections,
        }


def patch(
    model: torch.nn.Module,
    strategy: str | Strategy | None = None,
    keep: float | int | None = None,
    *,
    kv: str | KVPolicy | None = None,
    kv_budget: int | None = None,
    kv_options: dict | None = None,
    processor=None,
    **options,
) -> PatchHandle:
    """Install a visual-token compression strategy on `model` (in place, this instance only).

    Args:
        model: a supported transformers VLM (see `vtc.supported_models()`).
        strategy: a name from `vtc.list_strategies()` (hyphenated spellings such as "VTC-CLS" resolve),
            a Strategy instance, or None for no compression.
        keep: a float in (0, 1], the fraction of each image's visual tokens kept, or an int, the tokens
            kept per image. None takes the strategy's paper default.
        kv: a decode-time KV-cache policy from `vtc.kv.list_policies()` ("streaming", "h2o", "snapkv",
            "visual_aware") or a `vtc.kv.KVPolicy` instance; works on text-only LLMs too (strategy None).
        kv_budget: cache entries kept per layer (and KV head) by the policy.
        kv_options: the policy's options, e.g. {"sinks": 4} for streaming, {"window": 16} for snapkv.
        processor: the model's processor, for strategies that build prompts with it (QuoTA's frame scoring);
            the others ignore it, so loops over `vtc.list_strategies()` can always pass it.
        **options: strategy options (e.g. `layer=2` for FastV).

    Returns a PatchHandle: `report()`, `last_kept()`, `unpatch()`; also a context manager.

    Example:
        >>> handle = vtc.patch(model, strategy="fastv", keep=0.5)
        >>> out = model.generate(**inputs, max_new_tokens=20)
        >>> print(handle.report())
        >>> handle.unpatch()
    """
    if model in _ACTIVE:
        raise RuntimeError("this model is already patched by vtc: call handle.unpatch() (or vtc.unpatch(model)) first")
    if isinstance(strategy, (list, tuple)) and not strategy:
        raise ValueError(
            "an empty composition: pass a strategy name, a list of at least one (e.g. ['visionzip', 'fastv']), "
            "or None for no compression"
        )
    adapter = find_adapter(model)
    first = strategy[0] if isinstance(strategy, (list, tuple)) and strategy else strategy  # takes `keep`
    first = first[0] if isinstance(first, tuple) else first
    if keep is None and isinstance(first, Strategy):
        keep = first.keep
    if keep is not None:
        validate_keep(keep, adapter.tokens_per_image())
    else:  # the strategy's paper default
        from .strategies.base import get_strategy_class

        keep = getattr(get_strategy_class(first or "none"), "default_keep", 1.0)
    built = build_strategy(strategy, keep, options, processor)
    adapter.check(built)
    policy = build_policy(kv, kv_budget, kv_options)
    if policy is not None:
        policy.bind(adapter.language_model)
    handle = PatchHandle(model, adapter, built)
    handle.kv_policy = policy
    handle._patch_args = dict(keep=keep, processor=processor)  # what a deep copy is patched with
    try:
        adapter.install(handle)
    except BaseException:
        adapter.uninstall()
        raise
    _install_copy_guards(model, handle)
    _ACTIVE[model] = handle
    return handle


def _install_copy_guards(model: torch.nn.Module, handle: PatchHandle) -> None:
    """Instance attributes that `copy.deepcopy` and `pickle` look up on the object: a deep copy of a patched
    model is patched like the original (its own handle, `vtc.unpatch(copy)` works); pickling is refused with
    the fix, since the hooks on the model's modules are closures of this process."""

    def deepcopy_patched(memo):
        with _suspended(handle):
            clone = copy.deepcopy(model, memo)
        strategy = copy.deepcopy(handle.strategy, memo)
        kv = copy.deepcopy(handle.kv_policy, memo) if handle.kv_policy is not None else None
        patch(clone, strategy, handle._patch_args["keep"], kv=kv, processor=handle._patch_args["processor"])
        return clone

    def refuse_pickle(protocol=None):
        raise TypeError(
            f"a model patched by vtc cannot be pickled (torch.save(model) included): its hooks belong to this "
            f"process. Save the weights instead (model.save_pretrained(path) or torch.save(model.state_dict(), "
            f"path)) and call vtc.patch again after loading, or vtc.unpatch(model) first ({handle!r})"
        )

    vars(model).update(__deepcopy__=deepcopy_patched, __reduce_ex__=refuse_pickle, __reduce__=refuse_pickle)


_COPY_GUARDS = ("__deepcopy__", "__reduce_ex__", "__reduce__")


def _remove_copy_guards(model: torch.nn.Module) -> None:
    for name in _COPY_GUARDS:
        vars(model).pop(name, None)


@contextlib.contextmanager
def _suspended(handle: PatchHandle):
    """The model as if unpatched for the block (hooks, forward and copy guards removed), then patched again with
    the same handle, also after an error."""
    adapter = handle.adapter
    adapter.uninstall()
    _remove_copy_guards(handle.model)
    try:
        yield
    finally:
        adapter.install(handle)
        _install_copy_guards(handle.model, handle)


def unpatch(model: torch.nn.Module) -> None:
    """Undo `vtc.patch` on this model (no-op when it is not patched)."""
    handle = _ACTIVE.get(model)
    if handle is not None:
        handle.unpatch()


@contextlib.contextmanager
def patched(model: torch.nn.Module, strategy: str | Strategy | None = None, keep: float | int | None = None, **options):
    """`with vtc.patched(model, "fastv", keep=0.25) as handle: ...` unpatches on exit, even after an error."""
    handle = patch(model, strategy, keep, **options)
    try:
        yield handle
    finally:
        handle.unpatch()
