"""The decoder loop shared by Llama/Qwen2/Mistral-style language models, with per-layer sequence lengths.

`PrunedDecoder.forward` replaces the *instance's* language-model forward (never the class's). At prefill
it compacts the sequence to the tokens a pre-LLM strategy keeps, runs the decoder layers itself, and at an
in-LLM strategy's layers drops visual tokens from the hidden states; deeper layers then see (and cache)
the shorter sequence. At decode it builds each layer's mask from the keys that layer holds in its cache.

Kept tokens keep their original position ids. Every step passes an explicit attention mask: position ids
with gaps and no mask would otherwise be read by transformers as packed sequences (DESIGN.md, section 7).

The cache a prefill fills becomes a `PrunedCache` that carries its own bookkeeping (which entries are valid, the
logical length), so decoding, beam reordering, cropping and continuing a returned cache need no state elsewhere;
what one call captures (visual masks, probes, the report) is per thread (`vtc.local.PerThread`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..local import PerThread
from ..probes import decoder_attention_rows
from ..strategies.base import VisualTokens, last_valid_index

SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_attention(config) -> None:
    """Refuse an attention implementation the decoder loop cannot run (checked at patch() and at every call: a model
    can be switched after patching, e.g. `model.set_attn_implementation("flex_attention")`)."""
    implementation = config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise NotImplementedError(
            f"the language model uses attn_implementation={implementation!r}; vtc's decoder loop supports "
            f"{', '.join(SUPPORTED_ATTENTION)}: load the model with attn_implementation='sdpa' or call "
            "model.set_attn_implementation('sdpa') (or unpatch first)"
        )


@dataclass
class Sequence:
    """The physical token sequence at some point of the prefill (rows left-padded)."""

    hidden: torch.Tensor  # (B, L, D)
    positions: torch.Tensor  # (B, L) original position ids, or (3, B, L) for M-RoPE
    valid: torch.Tensor  # (B, L) bool, False for padding
    vis_index: torch.Tensor  # (B, L) index into the flat list of visual tokens, -1 for text

    def to(self, device: torch.device) -> Sequence:
        if self.hidden.device == device:
            return self
        return Sequence(*(t.to(device) for t in (self.hidden, self.positions, self.valid, self.vis_index)))

    def compact(self, keep: torch.Tensor) -> Sequence:
        index, used = compact_index(keep)
        return Sequence(
            _gather_tokens(self.hidden, index),
            _gather_tokens(self.positions, index),
            self.valid.gather(1, index) & used,
            self.vis_index.gather(1, index).masked_fill(~used, -1),
        )


@dataclass
class Segment:
    """What the decoder layers from `start_layer` on saw (and cached) at prefill."""

    start_layer: int
    valid: torch.Tensor
    positions: torch.Tensor
    vis_index: torch.Tensor


@dataclass
class CacheState:
    """What decoding needs to know about a prefill: per layer, which cached keys are valid.

    layer_valid[l] is (B, K_l) or, after a per-head KV eviction, (B, kv_heads, K_l). KV policies evict with
    `keep_entries`, which rewrites the cache and the validity together."""

    cache: object
    logical_len: int
    segments: list[Segment]
    layer_valid: list[torch.Tensor]
    decoded: int = 0
    extras: dict = field(default_factory=dict)

    def rows(self, pick) -> None:
        """Apply `pick` (a function of a (B, ...) tensor) to the rows of every per-row record: beam reordering,
        repeats of the batch. Layers that share one validity tensor keep sharing it."""
        done: dict[int, torch.Tensor] = {}
        self.layer_valid = [done.setdefault(id(v), pick(v)) for v in self.layer_valid]
        if "rope_deltas" in self.extras:
            self.extras["rope_deltas"] = pick(self.extras["rope_deltas"])

    def drop_last(self, n: int) -> None:
        """Forget the last n logical tokens (text or generated: never pruned, the last n entries of every layer)."""
        if n <= 0:
            return
        done: dict[int, torch.Tensor] = {}
        self.layer_valid = [done.setdefault(id(v), v[..., :-n]) for v in self.layer_valid]
        from_decoded = min(n, self.decoded)
        self.decoded -= from_decoded
        self.logical_len -= n - from_decoded

    def keep_entries(self, layer: int, index: torch.Tensor) -> None:
        """Keep only the cache entries `index` of `layer`: (B, K') for all heads or (B, kv_heads, K')."""
        cache_layer = self.cache.layers[layer]
        keys, values = cache_layer.keys, cache_layer.values  # (B, H, K, d)
        per_head = index if index.dim() == 3 else index[:, None].expand(-1, keys.shape[1], -1)
        gather = per_head[..., None].expand(-1, -1, -1, keys.shape[-1])
        cache_layer.keys, cache_layer.values = keys.gather(2, gather), values.gather(2, gather)
        valid = self.layer_valid[layer]
        if index.dim() == 3 and valid.dim() == 2:
            valid = valid[:, None].expand(-1, keys.shape[1], -1)
        self.layer_valid[layer] = valid.gather(-1, index if valid.dim() == index.dim() else per_head)


class PrunedCache(DynamicCache):
    """The DynamicCache a vtc prefill filled. vtc sets this class on the very cache object generate() passed (so
    generate keeps using it); the layers hold the physical, shorter entries and `vtc_state` (a CacheState) which of
    them are valid and the LOGICAL length. `get_seq_length` reports the logical length: generate() slices the inputs
    of a continuation (`generate(input_ids=out.sequences, past_key_values=out.past_key_values)`) and places
    cache positions by it. Beam reordering, batch repeats and cropping (assisted decoding) keep the validity in step
    with the entries."""

    vtc_state: CacheState

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.vtc_state.logical_len + self.vtc_state.decoded

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.vtc_state.rows(lambda v: v.index_select(0, beam_idx.to(v.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.vtc_state.rows(lambda v: v[indices.to(v.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.vtc_state.rows(lambda v: v.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # transformers 5.23 only takes a negative count: the tokens to remove
        self.vtc_state.drop_last(-tokens_to_remove)


def cache_state(cache) -> CacheState | None:
    """The CacheState of a cache a vtc prefill filled, else None."""
    return cache.vtc_state if isinstance(cache, PrunedCache) else None


@dataclass
class VisualLayout:
    """Which flat visual tokens belong to which image, and each image's token grid."""

    counts: list[int]  # visual tokens per image, images in order of appearance
    grids: list[tuple[int, int]]
    sample_of_image: list[int]
    extras: dict = field(default_factory=dict)
    # Optional: per unit, its flat visual-token indices (ascending, in its grid's raster order), for units
    # that are not contiguous runs of the flat tokens (e.g. a crop of LLaVA-NeXT's row-major crop grid).
    # Units must still be grouped by sample, in order. None: unit i is the run starts[i] .. + counts[i].
    members: list[torch.Tensor] | None = None

    def unit_tokens(self, unit: int, device=None) -> torch.Tensor:
        """Flat visual-token indices of one unit, in its grid's raster order."""
        if self.members is None:
            return torch.arange(self.starts[unit], self.starts[unit] + self.counts[unit], device=device)
        return self.members[unit].to(device)

    def local_index(self, units: list[int], flat: torch.Tensor) -> torch.Tensor:
        """(I, n) flat indices of tokens of `units` (one row per unit) -> their index in the unit's grid."""
        if self.members is None:
            return flat - torch.tensor([self.starts[u] for u in units], device=flat.device)[:, None]
        return torch.stack([torch.searchsorted(self.members[u].to(flat.device), row) for u, row in zip(units, flat)])

    @property
    def starts(self) -> list[int]:
        out, total = [], 0
        for c in self.counts:
            out.append(total)
            total += c
        return out


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: on a model dispatched by accelerate (`device_map`), its hook's execution device
    (weights offloaded to the CPU or disk are brought there for each call); else the device of its weights."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


def compact_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the kept entries in order, left-padded to the longest row.

    Returns (index (B, Lk), slot_used (B, Lk) bool); unused slots point at a dropped entry."""
    length = int(keep.sum(dim=1).max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - length :]
    return order, keep.gather(1, order)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token dimension: (B, L) ids, (B, L, D) hidden states, or (..., B, L) M-RoPE ids."""
    if x.dim() == 3 and x.shape[:2] == index.shape[:1] + (x.shape[1],) and x.dtype.is_floating_point:
        return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))
    if x.dim() == index.dim():
        return x.gather(-1, index)
    return x.gather(-1, index.expand(*x.shape[:-2], *index.shape))


def attention_mask_4d(
    key_valid: torch.Tensor,
    q_len: int,
    past_len: int,
    implementation: str,
    dtype: torch.dtype,
    heads_per_kv: int = 1,
) -> torch.Tensor:
    """(B, 1 or H, Q, K) mask: query i (at physical index past_len + i) sees valid keys at index <= its own.

    key_valid is (B, K), or (B, kv_heads, K) after per-head eviction (expanded to the query heads). Every
    query also sees itself, so padding rows never have an empty softmax (which would give NaN)."""
    k_len = key_valid.shape[-1]
    key_pos = torch.arange(k_len, device=key_valid.device)
    query_pos = past_len + torch.arange(q_len, device=key_valid.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    diagonal = key_pos[None, :] == query_pos[:, None]
    per_head = key_valid if key_valid.dim() == 3 else key_valid[:, None]
    allowed = (per_head[:, :, None, :] & causal) | diagonal
    if key_valid.dim() == 3 and heads_per_kv > 1:
        allowed = allowed.repeat_interleave(heads_per_kv, dim=1)
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


class PrunedDecoder:
    """Runs a language model's decoder layers with the selections of one strategy (see module docstring)."""

    state = PerThread(None)  # the CacheState of this thread's last prefill (each cache carries its own: `cache_state`)

    def __init__(self, handle, lm: torch.nn.Module, original_forward):
        self.handle = handle
        self.lm = lm
        self.original_forward = original_forward

    @property
    def layers(self):
        return self.lm.layers[: self.lm.config.num_hidden_layers]

    @property
    def heads_per_kv(self) -> int:
        config = self.lm.config
        return config.num_attention_heads // (
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        lm, handle = self.lm, self.handle
        check_attention(lm.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        call = handle._call
        if past_len == 0 and call is not None and call["expand"] > 1:
            return self._collapsed_prefill(
                call, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, kwargs
            )
        visual = handle.adapter.take_visual_mask()
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        plain = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if past_len > 0:
            state = cache_state(past_key_values)
            if state is not None:
                return self._decode(state, inputs_embeds, attention_mask, position_ids)
            return self.original_forward(**plain)  # a cache we did not fill: leave it alone
        self.state = None
        has_visual = visual is not None and bool(visual.any())
        if not has_visual and handle.kv_policy is None:
            handle._record_text_only(inputs_embeds.shape[0])
            return self.original_forward(**plain)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise NotImplementedError("vtc needs a 2-D attention mask (batch, sequence) at prefill")
        if use_cache is None:
            use_cache = lm.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=lm.config)
        if use_cache and type(past_key_values) is not DynamicCache:
            raise NotImplementedError(
                f"vtc's pruned prefill fills a DynamicCache (its layers get shorter than the prompt), not a "
                f"{type(past_key_values).__name__}: drop cache_implementation='static' (or the cache you passed) and "
                "let generate() use its default dynamic cache"
            )
        if visual is None:
            visual = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        want_hidden = bool(kwargs.get("output_hidden_states") or lm.config.output_hidden_states)
        prompt = call["prompt"] if call is not None else None
        if use_cache and prompt is not None and 0 < prompt < inputs_embeds.shape[1]:
            # assisted decoding verifies its first candidates in the prefill: select on the prompt alone (as a plain
            # generate() does), then run the candidates as decode steps
            return self._prefill_then_decode(
                prompt, inputs_embeds, visual, attention_mask, position_ids, past_key_values, want_hidden
            )
        return self._prefill(
            inputs_embeds, visual, attention_mask, position_ids, past_key_values, use_cache, want_hidden
        )

    def _collapsed_prefill(self, call, input_ids, attention_mask, position_ids, cache, embeds, use_cache, kwargs):
        """generate() repeats every sample `expand` times (num_beams, num_return_sequences) after the vision tower ran
        once per sample, so what vtc captured is per sample. The copies are equal at prefill: run the prefill (and
        the selection) on one copy of each sample, then repeat its cache and outputs, so that every copy decodes from
        its source sample's selection."""
        k = call["expand"]
        if use_cache is False:
            raise NotImplementedError(
                f"generate() with num_beams or num_return_sequences = {k} and use_cache=False re-runs the prefill at "
                "every step on beams that no longer match the vision features vtc captured per sample: keep the cache "
                "(use_cache=True, the default)"
            )

        def one_copy(x, dim=0):
            if x is None:
                return None
            source = x.unflatten(dim, (-1, k)).select(dim + 1, 0)
            if not torch.equal(source.repeat_interleave(k, dim=dim), x):
                raise RuntimeError(
                    f"generate() expanded the batch {k} times but the copies of a sample differ at prefill: vtc cannot "
                    "give every copy its source sample's selection"
                )
            return source

        self.handle.adapter.collapse_rows(k)
        call["expand"] = 1
        try:
            out = self.forward(
                input_ids=one_copy(input_ids),
                attention_mask=one_copy(attention_mask),
                position_ids=one_copy(position_ids, 1 if position_ids is not None and position_ids.dim() == 3 else 0),
                past_key_values=cache,
                inputs_embeds=one_copy(embeds),
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            call["expand"] = k
        if out.past_key_values is not None:
            out.past_key_values.batch_repeat_interleave(k)
        out.last_hidden_state = out.last_hidden_state.repeat_interleave(k, dim=0)
        if out.hidden_states is not None:
            out.hidden_states = tuple(h.repeat_interleave(k, dim=0) for h in out.hidden_states)
        return out

    def _prefill_then_decode(self, prompt, embeds, visual, attention_mask, position_ids, cache, want_hidden):
        """Prefill the first `prompt` tokens (the selection sees the prompt only), then decode the rest in one step."""
        if want_hidden:
            raise NotImplementedError(
                "output_hidden_states with assisted decoding on a vtc-patched model: drop output_hidden_states"
            )
        head = self._prefill(
            embeds[:, :prompt],
            visual[:, :prompt],
            attention_mask[:, :prompt] if attention_mask is not None else None,
            position_ids[..., :prompt] if position_ids is not None else None,
            cache,
            True,
            False,
        )
        tail = self._decode(
            cache_state(head.past_key_values),
            embeds[:, prompt:],
            attention_mask,
            position_ids[..., prompt:] if position_ids is not None else None,
        )
        hidden = torch.cat([head.last_hidden_state, tail.last_hidden_state], dim=1)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=head.past_key_values)

    # ------------------------------------------------------------------------------------------------
    def _prefill(self, embeds, visual, attention_mask, position_ids, cache, use_cache, want_hidden):
        handle, strategy, kv = self.handle, self.handle.strategy, self.handle.kv_policy
        b, length, _ = embeds.shape
        device = embeds.device
        valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(b, length, dtype=torch.bool, device=device)
        )
        if position_ids is None:
            position_ids = torch.arange(length, device=device).expand(b, -1)
        vis_index = torch.full((b, length), -1, dtype=torch.long, device=device)
        n_visual = int(visual.sum())
        vis_index[visual] = torch.arange(n_visual, device=device)
        layout = handle.adapter.visual_layout(visual, n_visual) if n_visual else VisualLayout([], [], [])
        selections: dict = {}
        seq = Sequence(embeds, position_ids, valid, vis_index)

        if n_visual and strategy.has_pre_llm:
            seq = self._prune(seq, "pre_llm", layout, selections, vision=handle.adapter.vision_probes(layout))
        prune_layers = set(strategy.prune_layers(len(self.layers))) if n_visual else set()
        router = _layer_router(strategy) if n_visual else None  # layer routing (p-MoD), see _routed_layer
        route_layers = set(router.route_layers(len(self.layers))) if router is not None else set()
        segments = [Segment(0, seq.valid, seq.positions, seq.vis_index)]
        implementation = self.lm.config._attn_implementation
        position_embeddings = self.lm.rotary_emb(seq.hidden, seq.positions)
        mask = attention_mask_4d(seq.valid, seq.hidden.shape[1], 0, implementation, seq.hidden.dtype)
        llm_probe = None
        all_hidden = []
        for i, layer in enumerate(self.layers):
            if i in prune_layers:
                seq = self._prune(seq, i, layout, selections, llm_probe=llm_probe)
                segments.append(Segment(i, seq.valid, seq.positions, seq.vis_index))
                position_embeddings = self.lm.rotary_emb(seq.hidden, seq.positions)
                mask = attention_mask_4d(seq.valid, seq.hidden.shape[1], 0, implementation, seq.hidden.dtype)
            # a model dispatched over several devices: the sequence follows the layer (no-ops on one device)
            device = execution_device(layer)
            seq, mask = seq.to(device), mask.to(device)
            position_embeddings = tuple(t.to(device) for t in position_embeddings)
            if i + 1 in prune_layers:
                llm_probe = self._llm_probe(layer, seq, position_embeddings, n_visual)
            if want_hidden:
                all_hidden.append(seq.hidden)
            if i in route_layers:
                probe = self._llm_probe(layer, seq, position_embeddings, n_visual) if router.route_probe else None
                seq = self._routed_layer(i, layer, seq, router, layout, selections, segments, probe, cache, use_cache)
            else:
                if kv is not None:
                    kv.observe_prefill(i, layer, seq.hidden, position_embeddings, seq.valid)
                seq.hidden = layer(
                    seq.hidden,
                    attention_mask=mask,
                    position_embeddings=position_embeddings,
                    position_ids=seq.positions,
                    past_key_values=cache if use_cache else None,
                    use_cache=use_cache,
                )
            injected = handle.adapter.after_decoder_layer(i, seq)  # e.g. Qwen3-VL's DeepStack features
            if injected is not None:
                seq.hidden = injected
        hidden = self.lm.norm(seq.hidden)
        if want_hidden:
            all_hidden.append(hidden)
        if use_cache:
            layer_valid = [
                next(s for s in reversed(segments) if s.start_layer <= i).valid for i in range(len(self.layers))
            ]
            extras = {}
            if position_ids.dim() == 3:  # M-RoPE: decode positions continue at the logical index + this delta
                top = position_ids.masked_fill(~valid, -1).amax(dim=(0, 2))
                extras["rope_deltas"] = (top + 1 - valid.sum(1))[:, None]
            self.state = CacheState(cache, length, segments, layer_valid, extras=extras)
            cache.__class__ = PrunedCache  # the same object generate() holds; see PrunedCache
            cache.vtc_state = self.state
            if kv is not None:
                kv.after_prefill(self.state)
        if n_visual:
            handle._record_prefill(layout, segments, len(self.layers), selections)
        else:
            handle._record_text_only(b)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if want_hidden else None,
        )

    def _prune(self, seq: Sequence, stage, layout: VisualLayout, selections: dict, vision=None, llm_probe=None):
        """Ask the strategy, image group by image group, which visual tokens stay; compact the sequence."""
        handle, strategy = self.handle, self.handle.strategy
        device = seq.hidden.device
        b, length = seq.valid.shape
        n_visual = sum(layout.counts)
        where = torch.full((n_visual,), -1, dtype=torch.long, device=device)  # flat token -> row of hidden
        present = seq.vis_index >= 0
        where[seq.vis_index[present]] = torch.arange(b * length, device=device).view(b, length)[present]
        alive = where >= 0
        hidden_flat = seq.hidden.reshape(b * length, -1)
        merged_rows, merged_values = [], []
        keep_flat = torch.zeros(n_visual, dtype=torch.bool, device=device)
        chosen = {}

        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for image in range(len(layout.counts)):
            tokens = layout.unit_tokens(image, device)
            tokens = tokens[alive[tokens]]
            groups.setdefault((len(tokens), layout.grids[image]), []).append((image, tokens))
        for (n_alive, grid), members in groups.items():
            image_ids = [m[0] for m in members]
            token_index = torch.stack([m[1] for m in members])  # (I, n) flat indices, ascending
            token_ids = layout.local_index(image_ids, token_index)  # local index in each image's grid
            ids = torch.tensor(image_ids, device=device)
            sel, merged = _reused_selection(handle, stage, image_ids, token_ids)
            if sel is None:
                visual = VisualTokens(
                    features=hidden_flat[where[token_index]],
                    grid=grid,
                    budget=strategy.stage_budget(layout.counts[image_ids[0]], n_alive, stage),
                    cls_attention=_probe_rows((vision or {}).get("cls", {}), ids, token_ids),
                    received_attention=_probe_rows((vision or {}).get("received", {}), ids, token_ids),
                    vision={kind: _probe_rows(v, ids, token_ids) for kind, v in (vision or {}).items()},
                    text_attention=llm_probe["text_attention"][token_index][:, None] if llm_probe else None,
                    image_index=ids,
                    token_ids=token_ids,
                    stage=stage,
                    context=dict(
                        sequence=seq,
                        rows=where[token_index],
                        sample=torch.tensor([layout.sample_of_image[i] for i in image_ids], device=device),
                        probe=llm_probe,
                        layout=layout,
                        lm=self.lm,
                        model=handle.model,  # the whole VLM (QuoTA scores frames with it, unpatched)
                        vision=vision,  # every unit's vision probes (HiRED budgets crops from the base image)
                    ),
                )
                sel, merged = _as_selection(strategy.select(visual))
            sel = sel.to(device)
            if sel.dtype == torch.bool:  # a keep-mask (I, n): images of one group may keep different counts
                keep_flat[token_index[sel]] = True
                if merged is not None:  # (I, n, D): the rows at kept tokens replace their features (QuoTA)
                    merged_rows.append(where[token_index[sel]])
                    merged_values.append(merged[sel])
                for row, image in enumerate(image_ids):
                    chosen[image] = (token_ids[row][sel[row]], merged[row][sel[row]] if merged is not None else None)
                continue
            kept_tokens = token_index.gather(1, sel)
            keep_flat[kept_tokens.reshape(-1)] = True
            if merged is not None:
                merged_rows.append(where[kept_tokens].reshape(-1))
                merged_values.append(merged.reshape(-1, merged.shape[-1]))
            for row, image in enumerate(image_ids):
                chosen[image] = (token_ids[row].gather(0, sel[row]), merged[row] if merged is not None else None)
        selections[stage] = chosen
        if merged_rows:
            hidden_flat = hidden_flat.index_copy(
                0, torch.cat(merged_rows), torch.cat(merged_values).to(hidden_flat.dtype)
            )
            seq = Sequence(hidden_flat.view(b, length, -1), seq.positions, seq.valid, seq.vis_index)
        keep = (seq.vis_index < 0) | keep_flat[seq.vis_index.clamp(min=0)]
        return seq.compact(keep)

    def _routed_layer(self, i, layer, seq: Sequence, router, layout, selections, segments, probe, cache, use_cache):
        """Layer routing (p-MoD): the text and the visual tokens `router.route` picks run through layer i, at
        their original positions under a causal mask among themselves, and only they enter layer i's KV cache
        (its CacheState validity comes from the Segment appended here); the layer's MLP output is scaled by
        each token's weight w. Visual tokens that skip the layer leave it as w * x. Every token returns for
        layer i + 1 (a second Segment restores the full sequence). Weights None: w = 1."""
        handle, kv = self.handle, self.handle.kv_policy
        is_vis = (seq.vis_index >= 0) & seq.valid
        run, weights = router.route(i, dict(sequence=seq, probe=probe, layout=layout, lm=self.lm))
        n_visual = sum(layout.counts)
        last = handle._last["selections"].get(("route", i)) if handle.reuse_selection and handle._last else None
        if last is not None and last.shape[0] == n_visual:  # recompute from the same routing (reuse_selection)
            run = last.to(run.device)[seq.vis_index.clamp(min=0)]
        run = run & is_vis
        flat = torch.zeros(n_visual, dtype=torch.bool, device=run.device)
        flat[seq.vis_index[run]] = True
        selections[("route", i)] = flat
        keep = ~is_vis | run
        index, used = compact_index(keep)
        sub = seq.compact(keep)
        implementation = self.lm.config._attn_implementation
        position_embeddings = self.lm.rotary_emb(sub.hidden, sub.positions)
        mask = attention_mask_4d(sub.valid, sub.hidden.shape[1], 0, implementation, sub.hidden.dtype)
        if kv is not None:
            kv.observe_prefill(i, layer, sub.hidden, position_embeddings, sub.valid)
        hook = None
        if weights is not None:
            w_sub = weights.gather(1, index).masked_fill(sub.vis_index < 0, 1.0)  # text and padding: w = 1
            hook = layer.mlp.register_forward_hook(lambda module, args, out: out * w_sub[..., None].to(out.dtype))
        try:
            out = layer(
                sub.hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=sub.positions,
                past_key_values=cache if use_cache else None,
                use_cache=use_cache,
            )
        finally:
            if hook is not None:
                hook.remove()
        hidden = seq.hidden
        if weights is not None:
            hidden = torch.where(is_vis[..., None], hidden * weights[..., None].to(hidden.dtype), hidden)
        rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        hidden = hidden.index_put((rows[used], index[used]), out[used])
        segments.append(Segment(i, sub.valid, sub.positions, sub.vis_index))
        segments.append(Segment(i + 1, seq.valid, seq.positions, seq.vis_index))
        return Sequence(hidden, seq.positions, seq.valid, seq.vis_index)

    def _llm_probe(self, layer, seq: Sequence, position_embeddings, n_visual: int) -> dict:
        """At the layer before a pruning point: the strategy's text queries' attention to each visual token
        (flat, (n_visual,)), from q and k of that layer; plus the layer input and its keys if asked."""
        strategy = self.handle.strategy
        b, length = seq.valid.shape
        device = seq.hidden.device
        if strategy.text_queries == "last":
            query_index = last_valid_index(seq.valid)[:, None]  # right padding: the real last token
            query_weight = torch.ones(b, 1, device=device)
        else:  # every valid text token, averaged
            is_text = (seq.vis_index < 0) & seq.valid
            query_index = torch.arange(length, device=device).expand(b, -1)
            query_weight = is_text.float() / is_text.sum(1, keepdim=True).clamp(min=1)
        rows = decoder_attention_rows(layer, seq.hidden, position_embeddings, query_index, seq.valid)
        per_key = (rows * query_weight[..., None]).sum(1)  # (B, L)
        flat = torch.zeros(n_visual, device=device)
        present = seq.vis_index >= 0
        flat[seq.vis_index[present]] = per_key[present]
        probe = {"text_attention": flat, "per_key": per_key, "vis_index": seq.vis_index, "valid": seq.valid}
        if getattr(strategy, "needs_keys", False):
            attn = layer.self_attn
            probe["keys"] = attn.k_proj(layer.input_layernorm(seq.hidden))  # (B, L, kv_heads * head_dim)
            probe["hidden_in"] = seq.hidden
        return probe

    # ------------------------------------------------------------------------------------------------
    def _decode(self, state: CacheState, embeds, attention_mask, position_ids):
        kv = self.handle.kv_policy
        if kv is not None and kv._state is not state:
            raise NotImplementedError(
                "this cache is not the one of this thread's last prefill, and the KV policy keeps its eviction state "
                "for that one only: continue a cache right after the call that returned it, or patch without kv="
            )
        b, q, _ = embeds.shape
        device = embeds.device
        if position_ids is None:
            position_ids = (state.logical_len + state.decoded + torch.arange(q, device=device)).expand(b, -1)
        expected = state.logical_len + state.decoded + q
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == expected:
            new_valid = attention_mask[:, expected - q :].bool()
        else:
            new_valid = torch.ones(b, q, dtype=torch.bool, device=device)
        implementation = self.lm.config._attn_implementation
        position_embeddings = self.lm.rotary_emb(embeds, position_ids)
        masks: dict[int, torch.Tensor] = {}
        grown: dict[int, torch.Tensor] = {}
        hidden = embeds
        for i, layer in enumerate(self.layers):
            valid = state.layer_valid[i]
            key = id(valid)
            if key not in masks:
                extra = new_valid.to(valid.device)
                extra = extra if valid.dim() == 2 else extra[:, None].expand(-1, valid.shape[1], -1)
                grown[key] = torch.cat([valid, extra], dim=-1)
                masks[key] = attention_mask_4d(
                    grown[key], q, valid.shape[-1], implementation, hidden.dtype, self.heads_per_kv
                )
            if kv is not None:
                device = execution_device(layer)
                hidden, position_embeddings = hidden.to(device), tuple(t.to(device) for t in position_embeddings)
                kv.observe_decode(i, layer, hidden, position_embeddings, state)
            hidden = layer(
                hidden,
                attention_mask=masks[key],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=state.cache,
                use_cache=True,
            )
        state.layer_valid = [grown[id(v)] for v in state.layer_valid]
        state.decoded += q
        if kv is not None:
            kv.after_decode(state)
        return BaseModelOutputWithPast(last_hidden_state=self.lm.norm(hidden), past_key_values=state.cache)


def _layer_router(strategy):
    """The strategy (or member of a composition) that routes visual tokens through layers: it has
    `route_layers(num_layers) -> layers`, `route_probe` (bool: wants the layer's text-to-visual attention
    rows as context["probe"]) and `route(layer, context) -> (run (B, L) bool, weights (B, L) or None)`."""
    return next((m for m in getattr(strategy, "members", [strategy]) if callable(getattr(m, "route", None))), None)


def _probe_rows(by_layer: dict, image_ids: torch.Tensor, token_ids: torch.Tensor) -> dict:
    """Vision probes (images, heads, N) restricted to some images and, per image, to its alive tokens."""
    out = {}
    for layer, value in by_layer.items():
        rows = value.to(image_ids.device)[image_ids]
        out[layer] = rows.gather(-1, token_ids[:, None].expand(-1, rows.shape[1], -1))
    return out


def _reused_selection(handle, stage, image_ids: list[int], token_ids: torch.Tensor):
    """`handle._frozen_selection`, image by image when the images of a group kept different counts (the last
    forward's selection was a keep-mask): then a keep-mask (I, n)."""
    if not handle.reuse_selection or len(image_ids) == 1:
        return handle._frozen_selection(stage, image_ids, token_ids)
    parts = [handle._frozen_selection(stage, [image], token_ids[row : row + 1]) for row, image in enumerate(image_ids)]
    if any(sel is None for sel, _ in parts):
        return None, None
    if len({sel.shape[-1] for sel, _ in parts}) == 1:
        merged = [m for _, m in parts]
        return torch.cat([sel for sel, _ in parts]), torch.cat(merged) if all(m is not None for m in merged) else None
    mask = torch.zeros(token_ids.shape, dtype=torch.bool, device=token_ids.device)
    for row, (sel, _) in enumerate(parts):
        mask[row, sel[0].to(mask.device)] = True
    if any(m is None for _, m in parts):
        return mask, None
    merged = parts[0][1].new_zeros(*token_ids.shape, parts[0][1].shape[-1])  # a keep-mask with merged rows
    for row, (sel, m) in enumerate(parts):
        merged[row, sel[0].to(mask.device)] = m[0].to(merged.dtype)
    return mask, merged


def _as_selection(result) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A strategy returns sorted indices (I, k), or (indices, merged features (I, k, D)), or a bool keep-mask
    (I, n) over the group's current tokens (images of one group may then keep different counts)."""
    index, merged = result if isinstance(result, tuple) else (result, None)
    if index.dtype == torch.bool:
        return index, merged
    order = torch.argsort(index, dim=-1)
    if not torch.equal(order, torch.arange(index.shape[-1], device=index.device).expand_as(order)):
        index = index.gather(-1, order)
        if merged is not None:
            merged = merged.gather(1, order[..., None].expand(-1, -1, merged.shape[-1]))
    return index, merged
