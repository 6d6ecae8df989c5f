"""The decoder loop shared by Llama/Qwen2/Mistral-style language models, with per-layer sequence lengths.

`PrunedDecoder.forward` replaces the *instance's* language-model forward (never the class's). At prefill
it compacts the sequence to the tokens a pre-LLM strategy keeps, runs the decoder layers itself, and at an
in-LLM strategy's layer drops visual tokens from the hidden states; deeper layers then see (and cache) the
shorter sequence. At decode it builds each layer's mask from the positions that layer holds in its cache.

Kept tokens keep their original position ids. Every step passes an explicit attention mask: position ids
with gaps and no mask would otherwise be read by transformers as packed sequences (DESIGN.md, section 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..probes import decoder_attention_rows
from ..strategies.base import VisualTokens

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class Segment:
    """The physical sequence that the decoder layers from `start_layer` on see (and cache) at prefill."""

    start_layer: int
    valid: torch.Tensor  # (B, L) bool, False for padding
    positions: torch.Tensor  # (B, L) original position ids
    vis_index: torch.Tensor  # (B, L) index into the flat list of visual tokens, -1 for text


@dataclass
class PrefillState:
    cache: object
    logical_len: int
    segments: list[Segment]
    decoded: int = 0

    def segment_for(self, layer: int) -> Segment:
        seg = self.segments[0]
        for s in self.segments:
            if s.start_layer <= layer:
                seg = s
        return seg


@dataclass
class VisualLayout:
    """Which flat visual tokens belong to which image, and each image's token grid."""

    counts: list[int]  # visual tokens per image, images in order of appearance
    grids: list[tuple[int, int]]
    sample_of_image: list[int]
    extras: dict = field(default_factory=dict)

    def groups(self):
        """Images sharing one (count, grid), with their flat token indices: [(image_ids, token_index (I, N), grid)]."""
        starts = [0]
        for c in self.counts[:-1]:
            starts.append(starts[-1] + c)
        by_shape: dict[tuple, list[int]] = {}
        for i, (c, g) in enumerate(zip(self.counts, self.grids)):
            by_shape.setdefault((c, g), []).append(i)
        for (c, g), ids in by_shape.items():
            index = torch.tensor([[starts[i] + j for j in range(c)] for i in ids], dtype=torch.long)
            yield ids, index, g


def compact_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the kept entries in order, left-padded to the longest row.

    Returns (index (B, Lk), slot_used (B, Lk) bool); unused slots point at a dropped entry."""
    length = int(keep.sum(dim=1).max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - length :]
    return order, keep.gather(1, order)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token dimension (the last one for ids, the one before features for hidden states)."""
    if x.dim() == index.dim():
        return x.gather(-1, index)
    if x.dim() == index.dim() + 1 and x.shape[:-1] == index.shape[:-1] + (x.shape[-2],):
        return x.gather(-2, index[..., None].expand(*index.shape, x.shape[-1]))
    # leading non-batch dims, e.g. M-RoPE position ids (3, B, L)
    return x.gather(-1, index.expand(*x.shape[:-2], *index.shape))


def attention_mask_4d(
    key_valid: torch.Tensor, q_len: int, past_len: int, implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """(B, 1, Q, K) mask: query i (at physical index past_len + i) sees valid keys at index <= its own.

    Every query also sees itself, so padding rows never have an empty softmax (which would give NaN)."""
    k_len = key_valid.shape[1]
    key_pos = torch.arange(k_len, device=key_valid.device)
    query_pos = past_len + torch.arange(q_len, device=key_valid.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = (key_valid[:, None, :] & causal[None]) | (key_pos[None, :] == query_pos[:, None])[None]
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


class PrunedDecoder:
    """Runs a language model's decoder layers with the selections of one strategy (see module docstring)."""

    def __init__(self, handle, lm: torch.nn.Module, original_forward):
        self.handle = handle
        self.lm = lm
        self.original_forward = original_forward
        self.state: PrefillState | None = None

    @property
    def layers(self):
        return self.lm.layers[: self.lm.config.num_hidden_layers]

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
        visual = handle.adapter.take_visual_mask()
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        plain = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if past_len > 0:
            if self.state is not None and past_key_values is self.state.cache:
                return self._decode(inputs_embeds, attention_mask, position_ids, past_key_values)
            return self.original_forward(**plain)  # a cache we did not fill: leave it alone
        self.state = None
        if visual is None or not bool(visual.any()):
            handle._record_text_only(inputs_embeds.shape[0])
            return self.original_forward(**plain)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise NotImplementedError("vtc needs a 2-D attention mask (batch, sequence) at prefill")
        if use_cache is None:
            use_cache = lm.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=lm.config)
        want_hidden = bool(kwargs.get("output_hidden_states") or lm.config.output_hidden_states)
        return self._prefill(
            inputs_embeds, visual, attention_mask, position_ids, past_key_values, use_cache, want_hidden
        )

    # ------------------------------------------------------------------------------------------------
    def _prefill(self, embeds, visual, attention_mask, position_ids, cache, use_cache, want_hidden):
        handle, strategy = self.handle, self.handle.strategy
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
        layout = handle.adapter.visual_layout(visual, n_visual)
        selections: dict[str, torch.Tensor] = {}

        hidden, positions = embeds, position_ids
        if strategy.stage == "pre_llm":
            flat = embeds[visual]
            keep_flat = self._select(layout, flat, "pre_llm", selections, handle.adapter.vision_probes(layout))
            keep = (vis_index < 0) | keep_flat[vis_index.clamp(min=0)]
            index, used = compact_index(keep)
            hidden = _gather_tokens(embeds, index)
            positions = _gather_tokens(position_ids, index)
            valid, vis_index = valid.gather(1, index) & used, vis_index.gather(1, index)

        segments = [Segment(0, valid, positions, vis_index)]
        position_embeddings = self.lm.rotary_emb(hidden, positions)
        implementation = self.lm.config._attn_implementation
        mask = attention_mask_4d(valid, hidden.shape[1], 0, implementation, hidden.dtype)
        prune_at = strategy.llm_layer if strategy.stage == "llm" else None
        text_attention = None
        all_hidden = []
        for i, layer in enumerate(self.layers):
            if i == prune_at:
                keep_flat = self._select(layout, None, "llm", selections, text_attention=text_attention)
                keep = (vis_index < 0) | keep_flat[vis_index.clamp(min=0)]
                index, used = compact_index(keep)
                hidden, positions = _gather_tokens(hidden, index), _gather_tokens(positions, index)
                valid, vis_index = valid.gather(1, index) & used, vis_index.gather(1, index)
                segments.append(Segment(i, valid, positions, vis_index))
                position_embeddings = self.lm.rotary_emb(hidden, positions)
                mask = attention_mask_4d(valid, hidden.shape[1], 0, implementation, hidden.dtype)
            if prune_at is not None and i == prune_at - 1:
                text_attention = self._text_attention(layer, hidden, position_embeddings, valid, vis_index, n_visual)
            if want_hidden:
                all_hidden.append(hidden)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=positions,
                past_key_values=cache if use_cache else None,
                use_cache=use_cache,
            )
        hidden = self.lm.norm(hidden)
        if want_hidden:
            all_hidden.append(hidden)
        if use_cache:
            self.state = PrefillState(cache, length, segments)
        handle._record_prefill(layout, segments, len(self.layers), selections)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if want_hidden else None,
        )

    def _select(self, layout, flat_features, stage, selections, probes=None, text_attention=None):
        """Ask the strategy for each group of same-shape images; returns keep (n_visual,) bool."""
        handle, strategy = self.handle, self.handle.strategy
        n_visual = sum(layout.counts)
        device = handle.device
        keep = torch.zeros(n_visual, dtype=torch.bool, device=device)
        chosen = {}
        for image_ids, token_index, grid in layout.groups():
            token_index = token_index.to(device)
            ids = torch.tensor(image_ids, device=device)
            frozen = handle._frozen_selection(stage, image_ids, token_index.shape[1])
            if frozen is not None:
                sel = frozen
            else:
                visual = VisualTokens(
                    features=flat_features[token_index] if flat_features is not None else token_index,
                    grid=grid,
                    budget=strategy.budget(token_index.shape[1]),
                    cls_attention={k: v[ids] for k, v in (probes or {}).get("cls", {}).items()},
                    received_attention={k: v[ids] for k, v in (probes or {}).get("received", {}).items()},
                    text_attention=text_attention[:, token_index].permute(1, 0, 2)
                    if text_attention is not None
                    else None,
                    image_index=ids,
                )
                sel = strategy.select(visual).to(device)
            keep[token_index.gather(1, sel).reshape(-1)] = True
            for row, image in enumerate(image_ids):
                chosen[image] = sel[row]
        selections[stage] = [chosen[i] for i in range(len(layout.counts))]
        return keep

    def _text_attention(self, layer, hidden, position_embeddings, valid, vis_index, n_visual):
        """(Q, n_visual): attention from the strategy's text queries to every flat visual token."""
        b, length = valid.shape
        device = hidden.device
        if self.handle.strategy.text_queries == "last":
            query_index = torch.full((b, 1), length - 1, dtype=torch.long, device=device)
            query_weight = torch.ones(b, 1, device=device)
        else:  # every valid text token, averaged
            is_text = (vis_index < 0) & valid
            query_index = torch.arange(length, device=device).expand(b, -1)
            query_weight = is_text.float() / is_text.sum(1, keepdim=True).clamp(min=1)
        rows = decoder_attention_rows(layer, hidden, position_embeddings, query_index, valid)  # (B, Q, L)
        per_key = (rows * query_weight[..., None]).sum(1)  # (B, L)
        flat = torch.zeros(n_visual, device=device)
        where = vis_index >= 0
        flat[vis_index[where]] = per_key[where]
        return flat[None]  # (1, n_visual): one query row per token (its own sample's)

    # ------------------------------------------------------------------------------------------------
    def _decode(self, embeds, attention_mask, position_ids, cache):
        state = self.state
        b, q, _ = embeds.shape
        device = embeds.device
        if position_ids is None:
            position_ids = (state.logical_len + state.decoded + torch.arange(q, device=device)).expand(b, -1)
        expected = state.logical_len + state.decoded + q
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == expected:
            generated_valid = attention_mask[:, state.logical_len :].bool()
        else:
            generated_valid = torch.ones(b, state.decoded + q, dtype=torch.bool, device=device)
        implementation = self.lm.config._attn_implementation
        position_embeddings = self.lm.rotary_emb(embeds, position_ids)
        masks = {}
        hidden = embeds
        for i, layer in enumerate(self.layers):
            seg = state.segment_for(i)
            if seg.start_layer not in masks:
                key_valid = torch.cat([seg.valid, generated_valid], dim=1)
                past = seg.valid.shape[1] + state.decoded
                masks[seg.start_layer] = attention_mask_4d(key_valid, q, past, implementation, hidden.dtype)
            hidden = layer(
                hidden,
                attention_mask=masks[seg.start_layer],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        state.decoded += q
        return BaseModelOutputWithPast(last_hidden_state=self.lm.norm(hidden), past_key_values=cache)
