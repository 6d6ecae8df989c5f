"""The KV-policy interface, the registry of policies, and what they share (stage 4 of DESIGN.md, section 3).

A KV policy decides which cache entries the decoder keeps while generating. It never touches the model:
the decoder loop (`vtc/adapters/decoder.py`) calls its hooks

- `observe_prefill(i, layer, hidden, position_embeddings, valid)` before decoder layer i at prefill,
- `after_prefill(state)` once the prompt is cached,
- `observe_decode(i, layer, hidden, position_embeddings, state)` before layer i at every decode step,
- `after_decode(state)` after every decode step,

and the policy evicts with `CacheState.keep_entries`, for all KV heads (B, K') or per KV head (B, kv_heads, K').

Conventions shared by every policy here:
- The budget is the most cache entries a layer holds per sample and KV head *between* forwards (after the
  prefill and after every decode step). During a decode step the new token's own key is appended before the
  policy evicts, so attention sees at most budget + 1 keys (as in H2O's reference code, which evicts after
  the attention of the step). SnapKV is prefill-only, as in its paper: its budget bounds the prompt's
  entries, and generated tokens are appended without eviction.
- Entries keep their original RoPE positions (keys are cached after RoPE, so evicting is dropping entries);
  new tokens continue at the logical position.
- Padding (left-padded batches) is never counted: sinks are the first valid entries, the window the last
  valid ones, so each sample of a batch keeps exactly what it keeps alone.
- Scores come from q and k of the layer, recomputed from its own projections (never `output_attentions`),
  per KV head: the query heads of a GQA group are averaged (as kvpress does for SnapKV, see
  https://github.com/FasterDecoding/SnapKV/issues/22).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..local import PerThread
from ..probes import project_qk


@dataclass
class KVSampleReport:
    """Cache entries of one sample, per decoder layer (max over KV heads)."""

    budget: int
    prompt_entries: list[int]  # valid entries the prefill cached, before eviction
    kept_after_prefill: list[int]
    visual_after_prefill: list[int]  # visual entries among those kept (0 for text-only prompts)
    current: list[int]  # after the last forward
    decoded: int


class KVReport:
    """What the KV policy kept; `str()` is the table the handle's report appends."""

    def __init__(self, policy: str, samples: list[KVSampleReport], bytes_now: int, peak_bytes: int):
        self.policy = policy
        self.samples = samples
        self.bytes_now = bytes_now
        self.peak_bytes = peak_bytes

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "bytes_now": self.bytes_now,
            "peak_bytes_after_forward": self.peak_bytes,
            "samples": [vars(s) for s in self.samples],
        }

    def lines(self) -> list[str]:
        head = f"{'sample':>6} {'budget':>6} {'prompt':>7} {'kept':>6} {'visual':>6} {'now':>6} {'decoded':>7}"
        out = [f"KV policy: {self.policy} (entries per layer, max over KV heads; last layer shown)", head]
        for i, s in enumerate(self.samples):
            out.append(
                f"{i:>6} {s.budget:>6} {s.prompt_entries[-1]:>7} {s.kept_after_prefill[-1]:>6} "
                f"{s.visual_after_prefill[-1]:>6} {s.current[-1]:>6} {s.decoded:>7}"
            )
        out.append(f"KV cache now {_mib(self.bytes_now)}, peak after a forward {_mib(self.peak_bytes)}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    __repr__ = __str__


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


class KVPolicy:
    """Base class. Subclasses set `name` and implement `keep_mask` (and `score_prefill`/`score_decode` when
    they score entries by attention). Options are keyword arguments of `__init__`, validated there."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    per_head: ClassVar[bool] = False  # evict per KV head (B, kv_heads, K') rather than for all heads
    evict_at_decode: ClassVar[bool] = True
    needs_prefill_scores: ClassVar[bool] = False
    needs_decode_scores: ClassVar[bool] = False
    # per call, so per thread (threads sharing one patched model keep their own caches)
    meta = PerThread([])
    prefill_scores = PerThread({})
    _pending = PerThread({})
    _prompt_entries = PerThread([])
    _kept_after_prefill = PerThread([])
    _visual_after_prefill = PerThread([])
    _next_position = PerThread(None)
    bytes_now = PerThread(0)
    peak_bytes = PerThread(0)
    _state = PerThread(None)

    def __init__(self, budget: int):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"kv_budget must be a positive int (cache entries per layer), got {budget!r}")
        self.budget = budget
        self.config = None
        self._reset()

    # --- setup ----------------------------------------------------------------------------------
    def bind(self, lm: torch.nn.Module) -> None:
        """Called by `vtc.patch` with the language model (the module holding `layers`, `norm`)."""
        self.config = lm.config

    def describe(self) -> str:
        return f"{self.name}(budget={self.budget})"

    def _reset(self) -> None:
        self.meta: list[dict[str, torch.Tensor]] = []  # per layer, tensors aligned with the cache entries
        self.prefill_scores: dict[int, torch.Tensor] = {}  # per layer, what the policy ranked at prefill
        self._pending: dict[int, torch.Tensor] = {}  # per layer, decode-step scores (before the append)
        self._prompt_entries: list[torch.Tensor] = []
        self._kept_after_prefill: list[torch.Tensor] = []
        self._visual_after_prefill: list[torch.Tensor] = []
        self._next_position: torch.Tensor | None = None
        self.bytes_now = 0
        self.peak_bytes = 0
        self._state = None

    # --- hooks called by the decoder loop --------------------------------------------------------
    def observe_prefill(self, i, layer, hidden, position_embeddings, valid) -> None:
        if i == 0:
            self._reset()
        if self.needs_prefill_scores:
            self.prefill_scores[i] = self.score_prefill(i, layer, hidden, position_embeddings, valid)

    def after_prefill(self, state) -> None:
        self._state = state
        heads = state.cache.layers[0].keys.shape[1]
        for i, valid in enumerate(state.layer_valid):
            seg = next(s for s in reversed(state.segments) if s.start_layer <= i)
            positions = seg.positions[0] if seg.positions.dim() == 3 else seg.positions
            meta = {"position": positions.clone(), "visual": seg.vis_index >= 0}
            if i in self.prefill_scores:
                meta["score"] = self.prefill_scores[i]
            if self.per_head:
                meta = {k: _per_head(v, heads) for k, v in meta.items()}
            self.meta.append(meta)
            self._prompt_entries.append(_count(valid))
        last = state.segments[0]
        pos = last.positions[0] if last.positions.dim() == 3 else last.positions
        self._next_position = pos.masked_fill(~last.valid, -1).max(dim=1).values + 1
        for i in range(len(state.layer_valid)):
            self._evict(state, i, self.keep_mask(i, state, prefill=True))
            valid = state.layer_valid[i]
            self._kept_after_prefill.append(_count(valid))
            self._visual_after_prefill.append(_count(valid & _like(self.meta[i]["visual"], valid)))
        self._measure(state)

    def observe_decode(self, i, layer, hidden, position_embeddings, state) -> None:
        if self.needs_decode_scores:
            self._pending[i] = self.score_decode(i, layer, hidden, position_embeddings, state)

    def after_decode(self, state) -> None:
        q = state.layer_valid[0].shape[-1] - self.meta[0]["position"].shape[-1]  # entries the step appended
        for i, meta in enumerate(self.meta):
            k_old = meta["position"].shape[-1]
            b = meta["position"].shape[0]
            step = torch.arange(q, device=meta["position"].device)
            new = {
                "position": self._next_position[:, None] + step,
                "visual": torch.zeros(b, q, dtype=torch.bool, device=meta["visual"].device),
            }
            if "score" in meta:
                contribution = self._pending.pop(i, None)
                if contribution is None:
                    contribution = torch.zeros(*meta["score"].shape[:-1], k_old + q, device=meta["score"].device)
                meta["score"] = torch.cat([meta["score"] + contribution[..., :k_old], contribution[..., k_old:]], -1)
            for key, value in new.items():
                old = meta[key]
                if old.dim() == 3:
                    value = value[:, None].expand(-1, old.shape[1], -1)
                meta[key] = torch.cat([old, value], dim=-1)
        self._next_position = self._next_position + q
        if self.evict_at_decode:
            for i in range(len(self.meta)):
                self._evict(state, i, self.keep_mask(i, state, prefill=False))
        self._measure(state)

    # --- to implement ---------------------------------------------------------------------------
    def keep_mask(self, layer: int, state, prefill: bool) -> torch.Tensor:
        """Which entries of `layer` stay: (B, K) or, for per-head policies, (B, kv_heads, K) bool, a subset
        of the valid entries with at most `budget` per row."""
        raise NotImplementedError

    def score_prefill(self, i, layer, hidden, position_embeddings, valid) -> torch.Tensor:
        raise NotImplementedError

    def score_decode(self, i, layer, hidden, position_embeddings, state) -> torch.Tensor:
        raise NotImplementedError

    # --- shared helpers -------------------------------------------------------------------------
    def valid(self, layer: int, state) -> torch.Tensor:
        """(B, K) or, for per-head policies, (B, kv_heads, K) validity of the layer's entries."""
        valid = state.layer_valid[layer]
        if self.per_head and valid.dim() == 2:
            valid = _per_head(valid, state.cache.layers[layer].keys.shape[1])
        return valid

    def _evict(self, state, layer: int, keep: torch.Tensor) -> None:
        """Compact the layer's cache to the entries `keep` marks (order kept; rows padded with dropped,
        now invalid, entries when samples or heads keep different counts)."""
        valid = self.valid(layer, state)
        keep = keep & valid
        if torch.equal(keep, valid):
            return
        length = int(keep.sum(-1).max())
        k = keep.shape[-1]
        index = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[..., k - length :]
        used = keep.gather(-1, index)
        state.keep_entries(layer, index)
        state.layer_valid[layer] = state.layer_valid[layer] & used
        self.meta[layer] = {key: _gather(value, index) for key, value in self.meta[layer].items()}

    def _measure(self, state) -> None:
        self.bytes_now = sum(cl.keys.nbytes + cl.values.nbytes for cl in state.cache.layers)
        self.peak_bytes = max(self.peak_bytes, self.bytes_now)

    def kept_positions(self, layer: int) -> list:
        """Per sample (and KV head for per-head policies), the position ids of the valid entries `layer`
        holds now, ascending. For tests and inspection."""
        state = self._require_state()
        valid = state.layer_valid[layer]
        pos = _like(self.meta[layer]["position"], valid)
        if valid.dim() == 2:
            return [pos[b][valid[b]].tolist() for b in range(valid.shape[0])]
        return [[pos[b, h][valid[b, h]].tolist() for h in range(valid.shape[1])] for b in range(valid.shape[0])]

    def _require_state(self):
        if self._state is None:
            raise RuntimeError("no prefill with a cache has run on the patched model yet")
        return self._state

    def report(self) -> KVReport | None:
        if self._state is None:
            return None
        state = self._state
        batch = state.layer_valid[0].shape[0]
        current = [_count(v) for v in state.layer_valid]
        samples = [
            KVSampleReport(
                budget=self.budget,
                prompt_entries=[int(c[b]) for c in self._prompt_entries],
                kept_after_prefill=[int(c[b]) for c in self._kept_after_prefill],
                visual_after_prefill=[int(c[b]) for c in self._visual_after_prefill],
                current=[int(c[b]) for c in current],
                decoded=state.decoded,
            )
            for b in range(batch)
        ]
        return KVReport(self.describe(), samples, self.bytes_now, self.peak_bytes)


# --- attention from q and k, per KV head -----------------------------------------------------------
def attention_per_kv_head(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    query_weight: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Sum over the queries of the attention probabilities each key receives, averaged over the query
    heads of each KV head's group: (B, kv_heads, K).

    q (B, heads, Q, d), k (B, kv_heads, K, d), allowed (B, Q, K) bool (every row needs one True),
    query_weight (B, Q) multiplies each query row (0 drops padding rows). Computed in chunks of `chunk`
    query rows, so no (Q x K) map is held for all queries at once."""
    b, heads, n_q, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    qg = q.view(b, kv_heads, groups, n_q, d)
    total = torch.zeros(b, kv_heads, k.shape[2], device=q.device)
    for start in range(0, n_q, chunk):
        rows = qg[:, :, :, start : start + chunk]
        scores = (rows @ k[:, :, None].transpose(-1, -2)) * scaling  # (B, kvh, G, c, K)
        scores = scores.masked_fill(~allowed[:, None, None, start : start + chunk], float("-inf"))
        probs = scores.softmax(dim=-1)
        if query_weight is not None:
            probs = probs * query_weight[:, None, None, start : start + chunk, None]
        total += probs.sum(dim=3).mean(dim=2)
    return total


def prefill_allowed(valid: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """(B, Q, L): causal over physical indices, valid keys only, and each query sees itself (no empty row)."""
    key_pos = torch.arange(valid.shape[1], device=valid.device)
    causal = key_pos[None, None] <= query_index[..., None]
    return (valid[:, None] & causal) | (key_pos[None, None] == query_index[..., None])


def decode_scores(layer, hidden, position_embeddings, state, i: int) -> torch.Tensor:
    """At a decode step, before layer i: the attention the new queries give to every cached entry and to
    themselves, per KV head, (B, kv_heads, K + q) (the K cached entries then the q new ones)."""
    q, k_new = project_qk(layer, hidden, position_embeddings)
    cache_layer = state.cache.layers[i]
    keys = torch.cat([cache_layer.keys.float(), k_new], dim=2)
    valid = state.layer_valid[i]
    kv_heads, n_new = keys.shape[1], q.shape[2]
    if valid.dim() == 2:
        valid = valid[:, None].expand(-1, kv_heads, -1)
    k_old = valid.shape[-1]
    causal = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril()
    allowed = torch.cat(
        [valid[:, :, None].expand(-1, -1, n_new, -1), causal.expand(*valid.shape[:2], -1, -1)], dim=-1
    )  # (B, kvh, q, K + q)
    groups = q.shape[1] // kv_heads
    qg = q.view(q.shape[0], kv_heads, groups, n_new, -1)
    scores = (qg @ keys[:, :, None].transpose(-1, -2)) * layer.self_attn.scaling
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    out = scores.softmax(-1).sum(dim=3).mean(dim=2)
    assert out.shape[-1] == k_old + n_new
    return out


# --- small tensor helpers ------------------------------------------------------------------------
def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.dim() == 3 else x[:, None].expand(-1, heads, -1)


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x (B, K) or (B, H, K) broadcast to ref's shape."""
    if x.dim() == ref.dim():
        return x
    return x[:, None].expand(-1, ref.shape[1], -1) if x.dim() == 2 else x[:, 0]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and index.dim() == 3:
        x = x[:, None].expand(-1, index.shape[1], -1)
    if x.dim() == 3 and index.dim() == 2:
        index = index[:, None].expand(-1, x.shape[1], -1)
    return x.gather(-1, index)


def _count(valid: torch.Tensor) -> torch.Tensor:
    """(B,) valid entries per sample, max over KV heads."""
    counts = valid.sum(-1)
    return counts.max(dim=1).values if counts.dim() == 2 else counts


def first_valid(valid: torch.Tensor, n: int) -> torch.Tensor:
    """The first n valid entries of every row (padding is not counted)."""
    return valid & (valid.cumsum(-1) <= n)


def last_valid(valid: torch.Tensor, n: int) -> torch.Tensor:
    """The last n valid entries of every row."""
    return valid & (valid.flip(-1).cumsum(-1).flip(-1) <= n)


def top_valid(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Mask of the n highest-scoring candidates of every row (fewer when a row has fewer candidates)."""
    k = min(n, scores.shape[-1])
    if k <= 0:
        return torch.zeros_like(candidates)
    ranked = scores.float().masked_fill(~candidates, -math.inf)
    index = ranked.topk(k, dim=-1).indices
    chosen = torch.zeros_like(candidates).scatter(-1, index, True)
    return chosen & candidates


# --- registry --------------------------------------------------------------------------------------
_POLICIES: dict[str, type[KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    _POLICIES[cls.name] = cls
    return cls


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


def get_policy_class(name: str) -> type[KVPolicy]:
    key = _canonical(name)
    for cls in _POLICIES.values():
        if key == cls.name or key in (_canonical(a) for a in cls.aliases):
            return cls
    raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(list_policies())}")


def build_policy(kv, budget, options: dict | None = None) -> KVPolicy | None:
    """A policy from a name (or an instance), its budget and options; fails loud on anything wrong."""
    options = dict(options or {})
    if kv is None:
        if budget is not None or options:
            raise ValueError(f"kv_budget/kv_options given without a KV policy: pass kv= one of {list_policies()}")
        return None
    if isinstance(kv, KVPolicy):
        if budget is not None or options:
            raise ValueError("kv is a KVPolicy instance: set its budget and options on the instance, not here")
        return kv
    if not isinstance(kv, str):
        raise TypeError(f"kv must be a policy name ({', '.join(list_policies())}) or a vtc.kv.KVPolicy")
    cls = get_policy_class(kv)
    if budget is None and getattr(cls, "needs_budget", True):
        raise ValueError(f"KV policy {cls.name!r} needs kv_budget=<cache entries per layer>, e.g. kv_budget=256")
    import inspect

    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "budget")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"KV policy {cls.name!r} has no option {', '.join(unknown)}; its options: {', '.join(known) or 'none'}"
        )
    return cls(budget, **options) if budget is not None else cls(**options)
