"""InternVL (`InternVLForConditionalGeneration`, InternVL2.5 / InternVL3 "-hf" checkpoints).

How the model lays out visual tokens (transformers 5.23, `InternVLModel.get_image_features`): the processor
cuts each picture into tiles of the vision input size (an (nh x nw) grid of tiles, row-major, chosen by the
picture's aspect ratio) plus a *thumbnail* (the whole picture resized to one tile) when there is more than
one tile; a picture that fits one tile is that tile only. A video is its frames, one tile each. All tiles of
a batch go to the vision tower as one flat `pixel_values` batch, in prompt order. InternViT prepends a [CLS]
token; the features of `config.vision_feature_layer` (-1: the last layer, after the tower's final norm,
otherwise `hidden_states[layer]`, 0 being the embeddings) lose the [CLS] ("default" select strategy), the
(s x s) patch grid is pixel-shuffled by `downsample_ratio` (0.5: one visual token = a 2x2 group of patches,
their features concatenated), and the projector maps each group to one token. A tile gives (s/2)^2 tokens
(256 for 448 px tiles and 14 px patches) in raster order; in the prompt each picture (or frame) is
`<img>` + its tiles' tokens, tile after tile + `</img>`, the tokens all `<IMG_CONTEXT>` (`image_token_id`).

What vtc makes of it (the LLaVA-NeXT unit convention, see `llava_next.py`):

- Every tile is a unit of the `VisualLayout` with its own budget, in sequence order: role "crop" for a tile
  of the grid (`crop` (i, j), `box` (row0, col0, row1, col1) of its tokens in the picture's stitched
  (nh*g x nw*g) token grid, `grid` (g, g)), role "base" for the thumbnail (the full picture: what HiRED-style
  strategies treat as the global view) and for a picture or video frame of a single tile. `patch` is the
  tile's index among its picture's tiles (the thumbnail is the last). `layout.extras["images"][i]` gives
  per picture: tiles, crops (nh, nw) ((0, 0) without crops), grid (stitched token grid, None without crops),
  thumbnail, downsampled (always False). `vtc.adapters.llava_next.kept_by_unit(handle)` works unchanged.
- A picture = a run of consecutive `<IMG_CONTEXT>` tokens (the processor closes each with `</img>`). The model
  does not receive the tile grid (only the tile count follows from the run length), so vtc finds (nh, nw)
  among the factorisations of the crop count by which one, stitched and pooled to a coarse grid, best matches
  the thumbnail (both are resizes of the same picture; a wrong arrangement scrambles it). This assumes the
  processor's thumbnail (InternVL always adds it with more than one tile).
- Videos: the model receives the frames as single-tile pictures ("Frame1: <img>...</img>\\n..."), so each
  frame is a "base" unit of modality "image" with its own budget; nothing tells a frame from a picture.

Vision probes, computed from q and k of the InternViT attention at a layer (q_norm / k_norm applied when the
tower has them), per tile, then pooled per visual token over the 2x2 patch group the pixel shuffle merges
into it (the group is found by running the model's own `pixel_shuffle` on patch indices):
- "cls": the [CLS] query's attention to the patches, per head, SUMMED over the group: a token's score is
  the [CLS] attention mass on its area, so the scores of a tile stay a distribution as on LLaVA (the [CLS]
  row over the tokens the LLM receives), and thresholds on cumulative mass (VisionZip-style) keep their
  meaning. Every token has exactly 4 patches, so the ranking equals that of the mean.
- "received": the attention each patch receives, averaged over the patch queries ([CLS] excluded, as on
  LLaVA), per head, SUMMED over the group, for the same reason.
- "keys": the keys averaged over heads, AVERAGED over the group (a vector: the mean keeps its scale, as
  ToMe averages the keys of merged tokens; cosine similarity does not depend on it).
"""

from __future__ import annotations

import torch

from ..local import PerThread
from .base import Adapter, CapturedUnits, register_adapter
from .decoder import VisualLayout

PROBE_KINDS = ("cls", "received", "keys")


def _qk(attn: torch.nn.Module, hidden_states: torch.Tensor, query_rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, heads, Q, d) of the rows `query_rows` and k (T, heads, N, d) of an InternViT attention, fp32, with
    the layer's q_norm / k_norm (over the whole embedding, before the head split, as the layer does)."""
    t, n, _ = hidden_states.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    rows = hidden_states[:, query_rows]
    q = attn.q_norm(attn.q_proj(rows)).reshape(t, rows.shape[1], heads, head_dim).transpose(1, 2).float()
    k = attn.k_norm(attn.k_proj(hidden_states)).reshape(t, n, heads, head_dim).transpose(1, 2).float()
    return q, k


def internvit_cls_attention(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(T, heads, N) attention of the [CLS] query (position 0) to every token, [CLS] included, at an InternViT
    attention layer whose input (already layer-normed) is `hidden_states` (T, N, D)."""
    q, k = _qk(attn, hidden_states, slice(0, 1))
    return ((q @ k.transpose(-1, -2)) * attn.scale).squeeze(2).softmax(dim=-1)


def internvit_attention_received(attn: torch.nn.Module, hidden_states: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(T, heads, N) attention each token receives, averaged over the patch queries 1..N-1 ([CLS] excluded),
    computed in chunks of `chunk` query rows (the N x N map is never whole)."""
    t, n, _ = hidden_states.shape
    q, k = _qk(attn, hidden_states, slice(1, n))
    total = torch.zeros(t, attn.num_heads, n, device=hidden_states.device)
    for start in range(0, q.shape[2], chunk):
        total += ((q[:, :, start : start + chunk] @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1).sum(dim=2)
    return total / max(n - 1, 1)


def internvit_keys(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(T, head_dim, N) keys (after k_norm) averaged over heads, tokens last."""
    t, n, _ = hidden_states.shape
    keys = attn.k_norm(attn.k_proj(hidden_states)).reshape(t, n, attn.num_heads, attn.head_dim)
    return keys.float().mean(dim=2).transpose(1, 2)


PROBES = {"cls": internvit_cls_attention, "received": internvit_attention_received, "keys": internvit_keys}
POOL = {"cls": "sum", "received": "sum", "keys": "mean"}


def infer_tile_grid(tiles: torch.Tensor, size: int = 16) -> tuple[int, int]:
    """(rows, cols) of the crop grid of one picture's tiles (T, C, H, W): the crops first, row-major, the
    thumbnail last. Among the factorisations of T - 1, the one whose stitched crops, average-pooled to
    (size x size), are closest (mean absolute difference) to the thumbnail pooled alike.

    Every tile is pooled once to (size x size) cells; a candidate's stitched (rows*size x cols*size) cell grid
    is then pooled by (rows x cols) blocks, which is the average over the same pixels."""
    n = tiles.shape[0] - 1
    candidates = [(r, n // r) for r in range(1, n + 1) if n % r == 0]
    if len(candidates) == 1:
        return candidates[0]
    cells = torch.nn.functional.adaptive_avg_pool2d(tiles.float(), (size, size))  # (T, C, size, size)
    thumb, crops = cells[-1], cells[:-1]
    c = cells.shape[1]
    errors = []
    for rows, cols in candidates:
        stitched = crops.view(rows, cols, c, size, size).permute(2, 0, 3, 1, 4).reshape(c, rows * size, cols * size)
        pooled = stitched.view(c, size, rows, size, cols).mean((2, 4))
        errors.append(float((pooled - thumb).abs().mean()))
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]


@register_adapter
class InternVLAdapter(CapturedUnits, Adapter):
    name = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    vision_records = True  # units, grids and tiles come from the vision call
    unit_names = "tile"
    # per thread (see Adapter)
    _calls = PerThread([])  # per vision-tower run: its tiles' pixels and probes
    _calls_used = PerThread(False)
    _pending_mask = PerThread(None)
    _layout = PerThread(None)
    _unit_probes = PerThread({})
    last_layout = PerThread(None)  # the units (tiles, thumbnails, frames) of the last prefill

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._groups: torch.Tensor | None = None

    # --- model facts ----------------------------------------------------------------------------
    @property
    def vision_layers(self):
        return self.inner.vision_tower.encoder.layer

    def num_vision_layers(self) -> int:
        return len(self.vision_layers)

    def has_cls(self) -> bool:
        """InternViT always prepends a [CLS] token (the "default" feature strategy drops it before the LLM)."""
        return True

    def feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        # -1: last_hidden_state (the last layer's output, then the tower's final norm); else hidden_states[layer]
        # with hidden_states[0] the embeddings, hidden_states[i + 1] the output of layer i
        return layer - 1 if layer > 0 else self.num_vision_layers() + layer

    def patch_grid(self) -> int:
        """Patches per side of a tile."""
        vision = self.model.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return size // patch

    def token_grid(self) -> int:
        """Visual tokens per side of a tile (after the pixel shuffle)."""
        return int(self.patch_grid() * self.model.config.downsample_ratio)

    def tokens_per_image(self) -> int:
        """Visual tokens of one tile: every unit (tile, thumbnail, frame) has exactly this many."""
        return self.token_grid() ** 2

    def check(self, strategy) -> None:
        super().check(strategy)
        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: InternVL's pixel "
                "shuffle needs the [CLS] token dropped; use 'default'"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError("InternVL with several vision feature layers is not supported: pass one int")
        kinds = set(strategy.vision_probes(self.num_vision_layers(), self.feature_layer()))
        unknown = kinds - set(PROBE_KINDS)
        if unknown:
            raise ValueError(
                f"strategy {strategy.name!r} reads vision probes {sorted(unknown)}, which the InternVL adapter "
                f"cannot provide (it provides {', '.join(PROBE_KINDS)}); choose another strategy"
            )

    # --- install --------------------------------------------------------------------------------
    def install_capture(self, handle) -> None:
        self._hooks.append(self.inner.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
        self._hooks.append(self.inner.vision_tower.register_forward_pre_hook(self._vision_start, with_kwargs=True))
        probes = handle.strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        for kind, layers in probes.items():
            for layer in layers:
                self._hooks.append(
                    self.vision_layers[layer].attention.register_forward_pre_hook(
                        self._probe_hook(kind, layer), with_kwargs=True
                    )
                )

    def uninstall(self) -> None:
        super().uninstall()
        self._calls, self._calls_used = [], False
        self._pending_mask, self._layout, self._unit_probes = None, None, {}

    def collapse_rows(self, k: int) -> None:
        super().collapse_rows(k)
        if self._pending_mask is not None:
            self._pending_mask = self._pending_mask[::k]

    def _capture_inputs(self, module, args, kwargs):
        """Inner-model pre-hook: which tokens are `<IMG_CONTEXT>`; a forward with pixel values starts afresh."""
        image_token_id = self.model.config.image_token_id
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("pixel_values") is not None:
            self._calls, self._calls_used = [], False
        if input_ids is not None:
            self._pending_mask = input_ids == image_token_id
        elif kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            token = self.inner.get_input_embeddings()(torch.tensor(image_token_id, device=embeds.device))
            self._pending_mask = (embeds == token).all(-1)

    def _vision_start(self, module, args, kwargs):
        if self._calls_used:  # a new vision run: the records of the last prefill are done with
            self._calls, self._calls_used = [], False
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self._calls.append({"pixels": pixels.detach(), "probes": {}})

    def groups(self, device: torch.device | str) -> torch.Tensor:
        """(tokens per tile, patches per token) patch indices of each visual token, from the model's own
        pixel_shuffle run on a grid of patch indices."""
        if self._groups is None or self._groups.device != device:
            side = self.patch_grid()
            index = torch.arange(side * side, dtype=torch.float64, device=device).view(1, side, side, 1)
            shuffled = self.inner.pixel_shuffle(index, scale_factor=self.model.config.downsample_ratio)
            self._groups = shuffled.reshape(-1, shuffled.shape[-1]).round().long()
        return self._groups

    def _probe_hook(self, kind: str, layer: int):
        probe, pool = PROBES[kind], POOL[kind]

        def hook(module, args, kwargs):
            if not self._calls:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                rows = probe(module, hidden)[..., 1:]  # (T, channels, patches): the [CLS] column dropped
                grouped = rows[..., self.groups(rows.device)]  # (T, channels, tokens, patches per token)
                value = grouped.sum(-1) if pool == "sum" else grouped.mean(-1)
            self._calls[-1]["probes"].setdefault(kind, {})[layer] = value

        return hook

    # --- the decoder loop asks ------------------------------------------------------------------
    def take_visual_mask(self) -> torch.Tensor | None:
        # the records stay until the vision tower runs again: generate(use_cache=False) re-runs the prefill
        # on the vision features it computed once
        mask, self._pending_mask = self._pending_mask, None
        self._layout = None
        if mask is None or not bool(mask.any()):
            return mask
        per_tile = self.tokens_per_image()
        calls = self._calls
        self._calls_used = True
        n_tiles = sum(int(c["pixels"].shape[0]) for c in calls)
        if n_tiles * per_tile != int(mask.sum()):
            raise RuntimeError(
                f"the prompt has {int(mask.sum())} image tokens but the vision tower of this call ran on {n_tiles} "
                f"tiles of {per_tile} tokens: run the vision tower and the language model in one call (pass the "
                "pixel values with the prompt)"
            )
        pixels = torch.cat([c["pixels"] for c in calls])
        infos, images, sample_of_unit = [], [], []
        tile = 0
        for sample, row in enumerate(mask):
            where = row.nonzero().squeeze(1)
            if not len(where):
                continue
            breaks = (where[1:] != where[:-1] + 1).nonzero().squeeze(1) + 1
            for run in torch.tensor_split(where, breaks.tolist()):
                if len(run) % per_tile:
                    raise RuntimeError(
                        f"a run of {len(run)} image tokens in sample {sample} is not a whole number of tiles of "
                        f"{per_tile} tokens: the placeholder count is wrong"
                    )
                count = len(run) // per_tile
                image = len(images)
                images.append(self._image_info(pixels[tile : tile + count]))
                for patch, unit in enumerate(self._tile_units(images[-1], count)):
                    unit.update(sample=sample, modality="image", image=image, patch=patch, unit=len(infos))
                    infos.append(unit)
                    sample_of_unit.append(sample)
                tile += count
        side = self.token_grid()
        self._layout = VisualLayout(
            [per_tile] * len(infos),
            [(side, side)] * len(infos),
            sample_of_unit,
            extras={"units": infos, "images": images, "videos": []},
        )
        merged: dict[str, dict[int, list[torch.Tensor]]] = {}
        for call in calls:
            for kind, by_layer in call["probes"].items():
                for layer, value in by_layer.items():
                    merged.setdefault(kind, {}).setdefault(layer, []).append(value)
        self._unit_probes = {
            kind: {layer: torch.cat(values) for layer, values in by.items() if len(values) == len(calls)}
            for kind, by in merged.items()
        }
        return mask

    def _image_info(self, tiles: torch.Tensor) -> dict:
        count = tiles.shape[0]
        if count == 1:
            return dict(tiles=1, crops=(0, 0), grid=None, thumbnail=False, downsampled=False)
        nh, nw = infer_tile_grid(tiles)
        side = self.token_grid()
        return dict(tiles=count, crops=(nh, nw), grid=(nh * side, nw * side), thumbnail=True, downsampled=False)

    def _tile_units(self, info: dict, count: int) -> list[dict]:
        side = self.token_grid()
        base = dict(role="base", crop=None, box=None, grid=(side, side))
        if count == 1:
            return [base]
        nw = info["crops"][1]
        units = []
        for t in range(count - 1):
            i, j = divmod(t, nw)
            box = (i * side, j * side, (i + 1) * side, (j + 1) * side)
            units.append(dict(role="crop", crop=(i, j), box=box, grid=(side, side)))
        return units + [base]
