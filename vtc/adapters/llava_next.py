"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images, a base image plus crops.

How the model lays out one image's visual tokens (transformers' `pack_image_features`): the vision tower
runs on the base image (the whole picture resized) and on every crop of the picture padded to the chosen
grid pinpoint, as one batch. The base image gives an (h x w) grid. The crops, (nh x nw) of them, are
stitched into one (nh*h x nw*w) grid, the padding rows (or columns) are cut away ("unpadding"), and one
`image_newline` token closes every row of that grid; the sequence is then: base tokens (raster order),
then the stitched grid row by row, each row followed by its newline token. An image that gets no crops
is its base tokens plus one newline token.

What vtc makes of it (the unit convention):

- Newline tokens are not visual tokens for vtc: strategies never see them and they are never dropped.
  `last_kept()` indexes a sample's visual tokens in sequence order with the newline tokens left out.
- Each image gives several *units* of the `VisualLayout`, each pruned with its own budget: the base image
  (role "base", its (h, w) grid), then one unit per crop that survives the unpadding (role "crop"), in
  row-major crop order. A crop's unit is the true sub-rectangle of the stitched, unpadded grid that came
  from that crop: its grid is (rows, cols) of that rectangle (edge crops lose the rows or columns that
  were padding), its tokens are in raster order of that rectangle. A crop that was padding only has no
  unit. Unit tokens are not contiguous in the sequence (the stitched grid is row-major across crops), so
  the layout lists each unit's `members`.
- `layout.extras["units"][u]` describes unit u: sample, modality ("image"), image (index of the image in
  the batch, order of appearance), role, patch (index of the crop in the image's vision batch: 0 is the
  base image, 1 + i * nw + j crop (i, j)), crop (i, j) or None, box (row0, col0, row1, col1) of the crop in
  the image's stitched unpadded grid (None for the base), grid. `layout.extras["images"][i]` gives per
  image the crop grid (nh, nw), the stitched grid (rows, cols) and whether it was downsampled; an image
  without crops has crops (0, 0) and grid None. (Videos, OneVision: `extras["videos"]`, see there.)
- OneVision downsamples (bilinear) a stitched grid that is too large: the crop of a downsampled token is
  that of its nearest source token, so units are still sub-rectangles (of the downsampled grid).
- Vision probes ([CLS] attention, attention received, keys) come from the vision tower per base image or
  crop; vtc passes them through the model's own packing code (`pack_image_features`: the same reshape,
  unpadding and, for OneVision, downsampling as the features), so every visual token gets the probe value
  of exactly the vision token its feature came from (or the same interpolation of them).

`kept_by_unit(handle)` turns `handle.last_kept()` into per-unit records (which image, base or which
crop, which frame for videos) with the kept tokens' indices in each unit's grid.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from ..local import PerThread
from ..probes import vit_attention_received
from .base import CapturedUnits, register_adapter
from .decoder import VisualLayout
from .llava import VISION_PROBES, LlavaAdapter


def attention_received_all(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, heads, N) attention each token receives, averaged over all N queries: for towers without [CLS]
    (SigLIP), where every query is a patch."""
    return vit_attention_received(attn, hidden_states, first_query=0)


class _Record:
    """One image (or video) as the model packed it: its length in the sequence, which positions are
    newline tokens, its units (positions in raster order of each unit's grid) and the probes per position."""

    def __init__(self, length: int, newline: torch.Tensor, units: list[dict], info: dict):
        self.length, self.newline, self.units, self.info = length, newline, units, info
        self.probes: dict[str, dict[int, torch.Tensor]] = {}  # kind -> layer -> (length, channels)


@register_adapter
class LlavaNextAdapter(CapturedUnits, LlavaAdapter):
    name = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    unit_names = "image/frame"
    vision_records = True  # units, grids and tiles come from the vision call
    vision_merge = False  # ToMe in the tower: LLaVA-1.5 only (crops would need the merge probe through packing)
    has_video = False
    # per thread (see Adapter): what this thread's vision tower and prompt gave
    _raw_probes = PerThread({})  # kind -> layer -> rows of the tower's last call
    _records = PerThread({})  # "image"/"video" -> [_Record] of the last vision call
    _pending_masks = PerThread(None)  # "image"/"video" -> (B, L) bool
    _layout = PerThread(None)
    _unit_probes = PerThread({})
    last_layout = PerThread(None)

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._wrapped: list[str] = []

    # --- model facts ----------------------------------------------------------------------------
    def tokens_per_image(self) -> int | None:
        return None  # depends on each image's size (anyres)

    def token_ids(self) -> dict[str, int]:
        ids = {"image": self.model.config.image_token_id}
        if self.has_video:
            ids["video"] = self.model.config.video_token_id
        return ids

    def drop_cls(self) -> bool:
        return self.has_cls() and self.model.config.vision_feature_select_strategy == "default"

    def check(self, strategy) -> None:
        super(LlavaAdapter, self).check(strategy)
        probes = strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        tower = type(self.inner.vision_tower).__name__
        if "cls" in probes and not self.has_cls():
            raise ValueError(
                f"strategy {strategy.name!r} reads [CLS] attention, but this vision tower ({tower}) has no "
                "[CLS] token; choose a strategy that does not (e.g. fopru, whose 'attention received' probe "
                "is averaged over all patch queries here, or fastv)"
            )
        if self.has_cls() and self.model.config.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={self.model.config.vision_feature_select_strategy!r} with a "
                f"[CLS] tower ({tower}): anyres packing cannot place the [CLS] token on the grid; use 'default'"
            )

    # --- install --------------------------------------------------------------------------------
    def install_capture(self, handle) -> None:
        inner = self.inner
        ids = self.token_ids()
        embed = inner.get_input_embeddings()
        model_name = type(self.model).__name__

        def capture_masks(module, args, kwargs):
            if not self.has_video and kwargs.get("pixel_values_videos") is not None:
                raise ValueError(
                    f"{model_name} has no video path: pixel_values_videos would be ignored. Pass the frames "
                    "as images, or use a model with a video path (LlavaOnevisionForConditionalGeneration)"
                )
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is not None:
                self._pending_masks = {kind: input_ids == tid for kind, tid in ids.items()}
            elif kwargs.get("inputs_embeds") is not None:
                embeds = kwargs["inputs_embeds"]
                self._pending_masks = {
                    kind: (embeds == embed(torch.tensor(tid, device=embeds.device))).all(-1)
                    for kind, tid in ids.items()
                }

        self._hooks.append(inner.register_forward_pre_hook(capture_masks, with_kwargs=True))
        self._wrap("pack_image_features", self._after_pack)
        if self.has_video:
            self._wrap("get_video_features", self._after_video)
        probes = handle.strategy.vision_probes(self.num_vision_layers(), self.feature_layer())
        for kind, layers in probes.items():
            for layer in layers:
                self._hooks.append(
                    self.vision_layers[layer].self_attn.register_forward_pre_hook(
                        self._raw_probe_hook(kind, layer), with_kwargs=True
                    )
                )

    def _wrap(self, name: str, after) -> None:
        """Instance attribute over a method of the inner model (the class is untouched); generate() reads
        the signature of get_*_features, so the wrapper keeps it (functools.wraps)."""
        original = getattr(self.inner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            after(original, inspect.signature(original).bind(*args, **kwargs), out)
            return out

        setattr(self.inner, name, wrapper)
        self._wrapped.append(name)

    def _raw_probe_hook(self, kind: str, layer: int):
        probe = VISION_PROBES[kind] if kind != "received" or self.has_cls() else attention_received_all

        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                rows = probe(module, hidden)
            self._raw_probes.setdefault(kind, {})[layer] = rows[..., 1:] if self.drop_cls() else rows

        return hook

    def uninstall(self) -> None:
        for name in self._wrapped:
            if name in vars(self.inner):
                delattr(self.inner, name)
        self._wrapped.clear()
        super().uninstall()
        self._raw_probes, self._records, self._pending_masks, self._layout = {}, {}, None, None

    def collapse_rows(self, k: int) -> None:
        super().collapse_rows(k)
        if self._pending_masks is not None:
            self._pending_masks = {kind: mask[::k] for kind, mask in self._pending_masks.items()}

    # --- what the vision side produced ------------------------------------------------------------
    def _after_pack(self, original, bound, out) -> None:
        """Record each image's structure by running the model's own packing on token coordinates."""
        features = bound.arguments["image_features"]
        h, w = self.grid()
        if any(f.shape[1] != h * w for f in features):
            raise NotImplementedError(f"image features of {features[0].shape[1]} tokens per crop, expected {h * w}")
        family = importlib.import_module(type(self.inner).__module__)
        pinpoints = self.model.config.image_grid_pinpoints
        image_size = self.model.config.vision_config.image_size
        sizes = bound.arguments["image_sizes"]
        shapes, coords = [], []
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        local = torch.stack([rr.flatten(), cc.flatten()], -1).float()  # (h*w, 2)
        for index, f in enumerate(features):
            n = f.shape[0]
            nh, nw = family.get_anyres_image_grid_shape(sizes[index], pinpoints, image_size) if n > 1 else (1, 1)
            shapes.append((nh, nw))
            crop = torch.arange(max(n - 1, 0))
            offset = torch.stack([crop // nw * h, crop % nw * w], -1).float()  # crop (i, j) -> (i*h, j*w)
            coords.append(torch.cat([local[None], local[None] + offset[:, None]]).to(f.device))
        packed = self._repack(original, bound, coords, torch.tensor([-1.0, -1.0], device=features[0].device))
        records = [self._image_record(c, f.shape[0], shape) for c, f, shape in zip(packed, features, shapes)]

        n_patches = [f.shape[0] for f in features]
        for kind, by_layer in self._raw_probes.items():
            for layer, rows in by_layer.items():
                if rows.shape[0] != sum(n_patches):
                    continue  # not from this vision call
                per_image = [r.transpose(1, 2).float() for r in rows.split(n_patches)]
                newline = torch.zeros(rows.shape[1], dtype=per_image[0].dtype, device=rows.device)
                for record, value in zip(records, self._repack(original, bound, per_image, newline)):
                    record.probes.setdefault(kind, {})[layer] = value.float()
        self._raw_probes = {}
        self._records["image"] = records

    @staticmethod
    def _repack(original, bound, features: list[torch.Tensor], newline: torch.Tensor) -> list[torch.Tensor]:
        args = dict(bound.arguments, image_features=features, image_newline=newline)
        return list(original(**args)[0])

    def _image_record(self, coords: torch.Tensor, n_patches: int, shape: tuple[int, int]) -> _Record:
        h, w = self.grid()
        length = coords.shape[0]
        newline = coords[:, 0] < -0.5
        base = dict(role="base", patch=0, crop=None, box=None, grid=(h, w))
        if n_patches == 1:
            base["positions"] = (~newline).nonzero().squeeze(1)
            return _Record(length, newline, [base], dict(crops=(0, 0), grid=None, downsampled=False))
        base["positions"] = torch.arange(h * w, device=coords.device)
        rest = torch.arange(h * w, length, device=coords.device)
        rows = int(newline[h * w :].sum())
        tokens = rest[~newline[h * w :]]
        cols = len(tokens) // rows
        r = torch.arange(len(tokens), device=coords.device).div(cols, rounding_mode="floor")
        c = torch.arange(len(tokens), device=coords.device) % cols
        nh, nw = shape
        ci = ((coords[tokens, 0] + 0.5) / h).floor().clamp(0, nh - 1).long()
        cj = ((coords[tokens, 1] + 0.5) / w).floor().clamp(0, nw - 1).long()
        units = [base]
        for i in range(nh):
            for j in range(nw):
                sel = (ci == i) & (cj == j)
                if not bool(sel.any()):
                    continue  # a crop that was padding only
                r0, r1, c0, c1 = int(r[sel].min()), int(r[sel].max()) + 1, int(c[sel].min()), int(c[sel].max()) + 1
                if int(sel.sum()) != (r1 - r0) * (c1 - c0):
                    raise RuntimeError("a crop's tokens do not form a rectangle of the packed grid")
                units.append(
                    dict(
                        role="crop",
                        patch=1 + i * nw + j,
                        crop=(i, j),
                        box=(r0, c0, r1, c1),
                        grid=(r1 - r0, c1 - c0),
                        positions=tokens[sel],
                    )
                )
        downsampled = bool((coords[tokens] != coords[tokens].round()).any())
        return _Record(length, newline, units, dict(crops=(nh, nw), grid=(rows, cols), downsampled=downsampled))

    def _after_video(self, original, bound, out) -> None:
        raise NotImplementedError  # OneVision only

    # --- the decoder loop asks ------------------------------------------------------------------
    def take_visual_mask(self) -> torch.Tensor | None:
        # the records stay until the vision tower runs again: generate(use_cache=False) re-runs the prefill
        # on the vision features it computed once
        masks, self._pending_masks = self._pending_masks, None
        records = self._records
        self._layout = None
        if masks is None:
            return None
        first = next(iter(masks.values()))
        visual = torch.zeros_like(first)
        if not any(bool(m.any()) for m in masks.values()):
            return visual
        batch, length = first.shape
        units, probes = [], {}
        for kind, mask in masks.items():
            if not bool(mask.any()):
                continue
            recs = records.get(kind)
            where = mask.nonzero()  # (n, 2) (sample, position), in sequence order
            if recs is None or sum(r.length for r in recs) != len(where):
                raise RuntimeError(
                    f"the prompt has {len(where)} {kind} tokens but the vision features of this call cover "
                    f"{sum(r.length for r in recs) if recs else 0}: run the vision tower and the language model "
                    "in one call (pass pixel values with the prompt)"
                )
            offset = 0
            for index, record in enumerate(recs):
                block = where[offset : offset + record.length]
                offset += record.length
                sample = int(block[0, 0])
                if bool((block[:, 0] != sample).any()):
                    raise RuntimeError(f"the tokens of {kind} {index} span two samples: its placeholder count is wrong")
                for unit in record.units:
                    pos = block[unit["positions"], 1]
                    info = {k: v for k, v in unit.items() if k != "positions"}
                    info.update(sample=sample, modality=kind)
                    info[kind] = index  # info["image"] or info["video"]: its index in the batch
                    values = {
                        (k, layer): v[unit["positions"]].T for k, by in record.probes.items() for layer, v in by.items()
                    }
                    units.append((sample, pos, info, values))
        flat = torch.full((batch, length), -1, dtype=torch.long, device=first.device)
        for sample, pos, _, _ in units:
            visual[sample, pos] = True
        flat[visual] = torch.arange(int(visual.sum()), device=first.device)
        units.sort(key=lambda u: int(flat[u[0], u[1][0]]))
        members = [flat[sample, pos] for sample, pos, _, _ in units]
        if any(bool((m[1:] <= m[:-1]).any()) for m in members):
            raise RuntimeError("a unit's tokens are not in sequence order")
        infos = [info for _, _, info, _ in units]
        for u, info in enumerate(infos):
            info["unit"] = u
        counts = [len(m) for m in members]
        width = max(counts)
        for u, (_, _, _, values) in enumerate(units):
            for (kind, layer), value in values.items():
                table = probes.setdefault(kind, {}).setdefault(layer, {})
                table[u] = torch.nn.functional.pad(value, (0, width - value.shape[-1]))
        self._unit_probes = {
            kind: {layer: torch.stack([rows[u] for u in range(len(units))]) for layer, rows in by.items()}
            for kind, by in probes.items()
            if all(len(rows) == len(units) for rows in by.values())
        }
        self._layout = VisualLayout(
            counts,
            [info["grid"] for info in infos],
            [info["sample"] for info in infos],
            extras={
                "units": infos,
                "images": [r.info for r in records.get("image") or []],
                "videos": [r.info for r in records.get("video") or []],
            },
            members=members,
        )
        return visual


def kept_by_unit(handle, stage: str = "final") -> list[list[dict]]:
    """Per sample of the last forward, per unit (base image, crop, video frame): the unit's description
    (`layout.extras["units"]`) plus `kept`, the sorted indices into the unit's own grid that were kept."""
    layout = getattr(handle.adapter, "last_layout", None)
    if layout is None:
        raise RuntimeError("no forward with visual tokens has run on this patched model yet")
    kept = handle.last_kept(stage)
    start, out = {}, []
    offset = 0
    for u, count in enumerate(layout.counts):
        start.setdefault(layout.sample_of_image[u], offset)
        offset += count
    for b, indices in enumerate(kept):
        rows = []
        for u, info in enumerate(layout.extras["units"]):
            if info["sample"] != b:
                continue
            members = layout.unit_tokens(u) - start[b]
            hit = torch.isin(members, indices.to(members.device))
            rows.append(dict(info, kept=hit.nonzero().squeeze(1)))
        out.append(rows)
    return out
