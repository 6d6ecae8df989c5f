"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres images and videos, SigLIP tower.

Images follow LLaVA-NeXT's layout and vtc's unit convention for it (see `llava_next.py`): one unit for the
base image and one per crop (sub-rectangles of the stitched, unpadded and possibly downsampled grid),
newline tokens never visual. A sample with several images gets no crops (the model's multi-image mode):
each image is then one "base" unit. Videos: the tower runs on every frame, the model pools each frame's
(h x w) grid to (ceil(h/2) x ceil(w/2)) and closes the video with one newline token; every frame is a unit
(role "frame", `frame` its index, `video` the video's index in the batch) with its own budget, and its
vision probes are pooled the same way as its features (the model's own `apply_pooling`).

The real model's tower is SigLIP, which has no [CLS] token: the [CLS] probe does not exist, and
strategies that read it (vtc_cls) are refused at `patch()` with a message naming the alternatives. The
"attention received" probe (fopru) is defined without [CLS]: the attention each patch receives, averaged
over all patch queries (`attention_received_all`). In-LLM strategies (fastv) need no vision probe.
"""

from __future__ import annotations

import math

import torch

from .base import register_adapter
from .llava_next import LlavaNextAdapter, _Record


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    has_video = True

    def _after_video(self, original, bound, out) -> None:
        pixels = bound.arguments["pixel_values_videos"]
        batch, frames = pixels.shape[:2]
        pooled = out.pooler_output  # (videos, frames * per_frame + 1 newline, D)
        per_frame = (pooled.shape[1] - 1) // frames
        h, w = self.grid()
        grid = (math.ceil(h / 2), math.ceil(w / 2))
        if grid[0] * grid[1] != per_frame:
            raise NotImplementedError(f"video frames of {per_frame} tokens, expected a pooled {grid} grid")
        length = frames * per_frame + 1
        newline = torch.zeros(length, dtype=torch.bool, device=pooled.device)
        newline[-1] = True

        def units():
            return [
                dict(
                    role="frame",
                    frame=f,
                    patch=f,
                    crop=None,
                    box=None,
                    grid=grid,
                    positions=torch.arange(f * per_frame, (f + 1) * per_frame, device=pooled.device),
                )
                for f in range(frames)
            ]

        # the normalised frames ride along in the video's info (QuoTA can score them with a separate scorer VLM)
        records = [
            _Record(length, newline, units(), dict(frames=frames, grid=grid, pixels=pixels[v])) for v in range(batch)
        ]
        for kind, by_layer in self._raw_probes.items():
            for layer, rows in by_layer.items():
                if rows.shape[0] != batch * frames:
                    continue  # not from this vision call
                values = self.inner.apply_pooling(rows.transpose(1, 2).float().contiguous())
                values = values.reshape(batch, frames * per_frame, -1)
                values = torch.cat([values, values.new_zeros(batch, 1, values.shape[-1])], dim=1)
                for record, value in zip(records, values):
                    record.probes.setdefault(kind, {})[layer] = value
        self._raw_probes = {}
        self._records["video"] = records
