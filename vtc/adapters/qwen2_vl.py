"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Dynamic resolution: each image gives a (h/2, w/2) grid of visual tokens (one token = a 2x2 block of 14 px
patches merged by the PatchMerger; `image_grid_thw` holds the patch grid), so images differ in token count.
A video of `t` temporal patches (pairs of frames) gives `t` frames of (h/2, w/2) tokens. The units the
strategies see (`visual_layout`) are the images and the video frames in order of appearance: every image and
every frame gets its own budget. `layout.extras["units"]` tells, per unit, its kind ("image"/"video"), the
index of its image/video, its temporal index `t` and its token grid.

Positions: the outer model computes the 3-D M-RoPE position ids (t, h, w) and caches its rope deltas; the
decoder loop keeps them (kept tokens keep their original (t, h, w) positions) and compacts them with the
embeddings and the mask. `mm_token_type_ids` is consumed by the outer model at the logical length (before the
language model), so nothing compacted ever reads it; generate() extends it at the logical length too. At
decode, when no position ids are given, the positions are the logical ones (logical length + tokens decoded +
rope delta), never derived from the physical, shorter cache.

[CLS] surrogate (the Qwen vision tower has no [CLS]): the "cls" and the "received" probes both give, per
merged token, the attention it receives at a vision layer: softmax(q k^T / sqrt(d)) within the layer's
attention segments (each image / video frame; each window in Qwen2.5-VL's windowed layers), averaged over
the segment's queries, kept per head, and averaged over the 4 patches the merger groups into the token (the
merger takes 4 consecutive patches: the processor orders patches 2x2-block-major). It is computed in query
chunks from q and k of that layer (with the vision rotary embedding), never as a full matrix; segments of one
length (a video's frames, the full windows) are one batch. So vtc_cls here ranks tokens by the attention they
receive summed over its layers, FoPru by that at the last layer.

Keys probe ("keys": VisionZip's contextual-token metric, ToMe's matching metric): the layer's keys with the vision
RoPE applied, averaged over heads and over the 4 patches of each merged token, (head_dim, tokens) per unit; only
the k third of the fused qkv projection is computed when no attention probe is asked at that layer. This is what
VisionZip's official Qwen2.5-VL code uses (github.com/dvlab-research/VisionZip, Qwen2_5_VL/qwen2_5vl_visionzip.py
at commit 68993a3, `Qwen2_5_VisionTransformerPretrainedModel.forward`): the last vision block (a full-attention
block in the released Qwen2.5-VL: `fullatt_block_indexes` ends with it) returns its softmax(q k^T / sqrt(d)) and
its rotated keys; the score is the attention received, mean over heads, summed over the queries, mean over the 4
patches (`view(-1, 4).mean`), put back from window order to raster order (`reverse_indices`); the keys are the
mean over the 4 patches and over heads. Our surrogate averages over the queries instead of summing: within one
image or frame (the segment of a full-attention layer) the ranking is the same.
"""

from __future__ import annotations

import torch

from ..local import PerThread
from ..probes import rotate_half
from .base import Adapter, register_adapter
from .decoder import VisualLayout, cache_state

CLS_SURROGATE = (
    "Qwen-VL has no [CLS]: the 'cls' probe is the attention each merged token receives at that vision layer "
    "(mean over queries of its image/frame, or window in windowed layers; per head; mean over its 4 patches)"
)


def vision_qk(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    queries: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """q and k, each (heads, S, head_dim) in fp32 with the vision RoPE applied, of a Qwen-VL vision attention layer
    (fused `qkv`); with `queries` False, q is None and only the k third of a plain qkv weight is multiplied.
    hidden_states: (S, D), the layer's input (already normed); position_embeddings: (cos, sin), each (S, head_dim)."""
    seq, dim = hidden_states.shape
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if queries or weight.shape != (3 * dim, dim):  # the module itself (also when its weight is packed/quantized)
        q, k, _ = attn.qkv(hidden_states).reshape(seq, 3, attn.num_heads, -1).unbind(1)
    else:
        q, k = None, torch.nn.functional.linear(
            hidden_states, weight[dim : 2 * dim], bias[dim : 2 * dim] if bias is not None else None
        ).view(seq, attn.num_heads, -1)
    cos, sin = (p.float()[:, None] for p in position_embeddings)

    def rotated(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x * cos + rotate_half(x) * sin).transpose(0, 1)

    return (rotated(q) if queries else None), rotated(k)


def attention_received(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float, max_scores: int = 1 << 22
) -> torch.Tensor:
    """(heads, S) attention each token receives within its attention segment (cu_seqlens: images/frames, or windows),
    softmax(q k^T * scaling) averaged over the segment's queries. Segments of one length (the frames of a video,
    the full windows) run as one batch, in query chunks of at most `max_scores` scores: never a full (S x S) map."""
    heads, seq, _ = q.shape
    total = q.new_zeros(heads, seq)
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        index = torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)  # (G, L)
        queries, keys = q[:, index], k[:, index].transpose(-1, -2)  # (H, G, L, d), (H, G, d, L)
        received = q.new_zeros(heads, len(starts), length)
        rows = max(1, max_scores // (heads * len(starts) * length))
        for row in range(0, length, rows):
            received += ((queries[:, :, row : row + rows] @ keys) * scaling).softmax(dim=-1).sum(dim=2)
        total[:, index] = received / length
    return total


def merged_keys(k: torch.Tensor, unit: int) -> torch.Tensor:
    """(head_dim, S / unit) keys per merged token: k (heads, S, head_dim) averaged over heads and over the `unit`
    consecutive patches the merger groups into one token, tokens last (VisionZip's Qwen2.5-VL reduction)."""
    _, seq, dim = k.shape
    return k.mean(dim=0).view(seq // unit, unit, dim).mean(dim=1).transpose(0, 1)


@register_adapter
class QwenVLAdapter(Adapter):
    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    vision_records = True  # units, grids and tiles come from the vision call
    notes: list[str] = []  # set at install: names the [CLS] surrogate when the strategy reads it
    # per thread (see Adapter)
    _pending_kinds = PerThread(None)  # (B, L): 1 image token, 2 video token
    _vision_calls = PerThread([])  # per vision-tower run: its grid, probes and patches
    _calls_used = PerThread(False)
    _grids_given = PerThread({})
    last_layout = PerThread(None)  # the units (images, video frames) of the last prefill

    @property
    def visual(self) -> torch.nn.Module:
        return self.inner.visual

    @property
    def merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def num_vision_layers(self) -> int:
        return len(self.visual.blocks)

    def feature_layer(self) -> int:
        return self.num_vision_layers() - 1  # the merger reads the last block's output

    def supports_video(self) -> bool:
        return getattr(self.model.config, "video_token_id", None) is not None

    def check(self, strategy) -> None:
        super().check(strategy)
        kinds = set(strategy.vision_probes(self.num_vision_layers(), self.feature_layer()))
        unknown = kinds - {"cls", "received", "keys"}
        if unknown:
            raise ValueError(
                f"strategy {strategy.name!r} reads vision probes {sorted(unknown)}, which the Qwen-VL adapter "
                "cannot provide (it provides 'cls', a surrogate, 'received' and 'keys'); choose another strategy"
            )

    # --- hooks ------------------------------------------------------------------------------------
    def install_capture(self, handle) -> None:
        self._hooks.append(self.inner.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
        self._hooks.append(self.language_model.register_forward_pre_hook(self._llm_positions, with_kwargs=True))
        probes = handle.strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        self.notes = [CLS_SURROGATE] if {"cls", "received"} & set(probes) else []
        layers = sorted({layer for by_kind in probes.values() for layer in by_kind})
        self._probe_kinds = {layer: [kind for kind, ls in probes.items() if layer in ls] for layer in layers}
        self._hooks.append(self.visual.register_forward_pre_hook(self._vision_start, with_kwargs=True))
        for layer in layers:
            self._hooks.append(
                self.visual.blocks[layer].attn.register_forward_pre_hook(self._probe_hook(layer), with_kwargs=True)
            )

    def uninstall(self) -> None:
        super().uninstall()
        self._pending_kinds = None
        self._vision_calls = []
        self._grids_given = {}

    def collapse_rows(self, k: int) -> None:
        super().collapse_rows(k)
        if self._pending_kinds is not None:
            self._pending_kinds = self._pending_kinds[::k]

    def _capture_inputs(self, module, args, kwargs):
        """Outer-model pre-hook: which tokens are images (1) / videos (2); logical decode positions."""
        config = self.model.config
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        state = cache_state(cache)
        if state is not None and cache.get_seq_length() > 0:
            if kwargs.get("position_ids") is None:
                embeds = kwargs.get("inputs_embeds")
                shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
                device = input_ids.device if input_ids is not None else embeds.device
                kwargs["position_ids"] = self._decode_positions(state, kwargs.get("attention_mask"), shape, device)
            self._pending_visual = None
            return args, kwargs
        has_videos = kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None
        if has_videos and not self.supports_video():
            raise ValueError(
                f"video inputs were given, but this {type(self.model).__name__} has no video token "
                "(config.video_token_id is None): pass the frames as images, or use a model with a video path"
            )
        if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
            self._vision_calls, self._calls_used = [], False  # the tower runs inside this forward: drop old records
        self._grids_given = {"image": kwargs.get("image_grid_thw"), "video": kwargs.get("video_grid_thw")}
        if input_ids is not None:
            kinds = (input_ids == config.image_token_id).long()
            if self.supports_video():
                kinds = kinds + 2 * (input_ids == config.video_token_id).long()
        elif kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            embed = self.inner.get_input_embeddings()
            token = embed(torch.tensor(config.image_token_id, device=embeds.device))
            kinds = (embeds == token).all(-1).long()
            if self.supports_video():
                token = embed(torch.tensor(config.video_token_id, device=embeds.device))
                kinds = kinds + 2 * (embeds == token).all(-1).long()
        else:
            return args, kwargs
        self._pending_kinds = kinds
        self._pending_visual = kinds > 0
        return args, kwargs

    def _decode_positions(self, state, attention_mask, shape, device) -> torch.Tensor:
        """(3, B, q) M-RoPE ids of decode tokens: logical index (from the logical mask, else the logical
        length) + the outer model's rope delta; the physical cache is shorter after pruning."""
        b, q = shape
        expected = state.logical_len + state.decoded + q
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == expected:
            text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -q:]
        else:
            text = (state.logical_len + state.decoded + torch.arange(q, device=device)).expand(b, -1)
        delta = state.extras.get("rope_deltas")  # of this cache's prefill (the model's own is the last call's)
        if delta is None:
            delta = torch.zeros(b, 1, dtype=torch.long, device=device)
        delta = delta.to(device).repeat_interleave(b // delta.shape[0], dim=0)
        return (text + delta)[None].expand(3, -1, -1)

    def _llm_positions(self, module, args, kwargs):
        """Language-model pre-hook: generate() passes (4, B, L) ids (a text row, then t/h/w); the decoder loop
        takes the (3, B, L) M-RoPE ids, as HF's text model does after splitting the text row off."""
        positions = kwargs.get("position_ids")
        if positions is None or positions.dim() != 3 or positions.shape[0] != 4:
            return args, kwargs
        ours = cache_state(kwargs.get("past_key_values")) is not None or (
            self._pending_visual is not None and bool(self._pending_visual.any())
        )
        if ours or self.decoder.handle.kv_policy is not None:
            kwargs["position_ids"] = positions[1:]
        return args, kwargs

    def _vision_start(self, module, args, kwargs):
        if self._calls_used:  # a new vision run: the records of the last prefill are done with
            self._vision_calls, self._calls_used = [], False
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        pixels = kwargs.get("hidden_states", args[0] if args else None)  # the processor's patches (QuoTA's scorer)
        record = {"grid": grid.detach().clone(), "probes": {}, "pixels": pixels}
        if hasattr(module, "fullatt_block_indexes"):  # Qwen2.5-VL: patches are permuted window by window
            from transformers.vision_utils import get_vision_window_index

            window_index = kwargs.get("window_index")
            if window_index is None:
                config = module.config
                window_index, _ = get_vision_window_index(
                    grid, config.spatial_merge_size, config.window_size, config.patch_size
                )
            record["order"] = torch.argsort(window_index.to(grid.device))
        self._vision_calls.append(record)

    def _probe_hook(self, layer: int):
        kinds = self._probe_kinds[layer]
        attention = any(kind in ("cls", "received") for kind in kinds)
        unit = self.merge**2

        def hook(module, args, kwargs):
            if not self._vision_calls:
                return
            record = self._vision_calls[-1]
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                q, k = vision_qk(module, hidden, kwargs["position_embeddings"], queries=attention)
                values = {}  # per kind, (channels, merged tokens) in the tower's order
                if attention:  # 4 consecutive patches = one merged token
                    received = attention_received(q, k, kwargs["cu_seqlens"], module.scaling)
                    values["cls"] = values["received"] = received.view(received.shape[0], -1, unit).mean(-1)
                if "keys" in kinds:
                    values["keys"] = merged_keys(k, unit)
            for kind in kinds:
                rows = values[kind]
                if "order" in record:
                    rows = rows[:, record["order"].to(rows.device)]
                record["probes"].setdefault(kind, {})[layer] = rows

        return hook

    # --- layout -----------------------------------------------------------------------------------
    def _sources(self, n_image: int, n_video: int) -> dict:
        """Match the vision-tower calls of this forward to images and videos (images run first). The records stay
        until the tower runs again: generate(use_cache=False) re-runs prefills on the same encoder outputs."""
        calls = list(self._vision_calls)
        self._calls_used = True
        found = {}
        for kind, n in (("video", n_video), ("image", n_image)):
            if not n:
                continue
            call = calls.pop() if calls else None
            grid = call["grid"] if call is not None else self._grids_given.get(kind)
            if grid is None:
                raise RuntimeError(
                    f"the prompt has {kind} tokens but vtc saw no {kind} grid: call the patched model with "
                    f"pixel values and {kind}_grid_thw (or generate()), not with vision features computed before "
                    "patching"
                )
            if int((grid.prod(-1) // self.merge**2).sum()) != n:
                raise ValueError(
                    f"{n} {kind} tokens in the prompt but {kind}_grid_thw {grid.tolist()} gives "
                    f"{int((grid.prod(-1) // self.merge**2).sum())}: build the inputs with the model's processor"
                )
            found[kind] = call if call is not None else {"grid": grid, "probes": {}}
        return found

    def visual_layout(self, visual: torch.Tensor, n_visual: int) -> VisualLayout:
        kinds = self._pending_kinds
        if kinds is not None and kinds.shape[1] > visual.shape[1] and not bool(kinds[:, visual.shape[1] :].any()):
            kinds = kinds[:, : visual.shape[1]]  # a prefill of the prompt alone (assisted decoding's first candidates)
        if kinds is None or kinds.shape != visual.shape:
            raise RuntimeError("vtc did not see this forward's input ids: call the model itself, not its parts")
        flat_kinds = kinds[visual]
        device = visual.device
        n_image, n_video = int((flat_kinds == 1).sum()), int((flat_kinds == 2).sum())
        sources = self._sources(n_image, n_video)
        units = []  # (first flat index, kind, source index, t, grid, merged-token offset in its call)
        for kind, code in (("image", 1), ("video", 2)):
            if kind not in sources:
                continue
            flat = (flat_kinds == code).nonzero().squeeze(1).tolist()
            offset = 0
            for source, (t, h, w) in enumerate(sources[kind]["grid"].tolist()):
                grid = (h // self.merge, w // self.merge)
                for frame in range(t):
                    count = grid[0] * grid[1]
                    tokens = flat[offset : offset + count]
                    if tokens != list(range(tokens[0], tokens[0] + count)):
                        raise ValueError(f"the tokens of {kind} {source} are not contiguous in the prompt")
                    units.append((tokens[0], kind, source, frame, grid, offset))
                    offset += count
        units.sort(key=lambda u: u[0])
        per_sample = visual.sum(dim=1).cumsum(0).tolist()
        sample_of = [next(b for b, end in enumerate(per_sample) if u[0] < end) for u in units]
        counts = [u[4][0] * u[4][1] for u in units]
        self._probes = {}
        for kind in sorted({k for s in sources.values() for k in s["probes"]}):
            for layer in sorted({layer for s in sources.values() for layer in s["probes"].get(kind, {})}):
                rows = []
                for (_, source_kind, _, _, _, offset), count in zip(units, counts):
                    value = sources[source_kind]["probes"].get(kind, {}).get(layer)
                    if value is None:
                        raise RuntimeError(f"no {kind} probe at vision layer {layer} for the {source_kind}s")
                    rows.append(value[:, offset : offset + count])
                width = max(counts)
                padded = torch.zeros(len(rows), rows[0].shape[0], width, device=device)
                for i, r in enumerate(rows):
                    padded[i, :, : r.shape[1]] = r.to(device)
                self._probes.setdefault(kind, {})[layer] = padded
        extras = {
            "units": [
                {"kind": kind, "index": source, "t": frame, "grid": grid} for _, kind, source, frame, grid, _ in units
            ],
            "cls_surrogate": CLS_SURROGATE,
            "video_pixels": (sources["video"].get("pixels"), sources["video"]["grid"]) if "video" in sources else None,
        }
        self.last_layout = VisualLayout(counts, [u[4] for u in units], sample_of, extras)
        return self.last_layout

    def vision_probes(self, layout: VisualLayout) -> dict[str, dict[int, torch.Tensor]]:
        wanted = self.decoder.handle.strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        for kind, layers in wanted.items():
            missing = [layer for layer in layers if layer not in self._probes.get(kind, {})]
            if missing:
                raise RuntimeError(
                    f"the strategy reads the {kind} probe at vision layers {missing}, but the vision tower did not "
                    "run under vtc's hooks: pass pixel values to the patched model (or use generate()), not "
                    "vision features computed before patching"
                )
        return super().vision_probes(layout)
