"""`vtc.train`: train a strategy's own parameters with the VLM frozen. One module per trainable strategy
(`dyvte.py`: DyVTE's routers, `pmod.py`: p-MoD's routers, `atp.py`: ATP's threshold modules) over the shared
data, optimiser and bookkeeping of `base.py`.

    result = vtc.train(model, strategy="dyvte", data=samples, processor=processor, steps=200, save="dyvte.safetensors")
    handle = vtc.patch(model, strategy="dyvte", weights="dyvte.safetensors")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .base import DEFAULT_LR, TRAINABLE, TrainResult
from .dyvte import exit_labels, train_dyvte

__all__ = ["DEFAULT_LR", "TRAINABLE", "TrainResult", "exit_labels", "train"]


def train(
    model: torch.nn.Module,
    strategy: str = "dyvte",
    data: Iterable | None = None,
    *,
    steps: int | None = None,
    lr: float | None = None,
    save: str | Path | None = None,
    processor=None,
    batch_size: int = 8,
    exit_layers: list[int] | None = None,
    warmup_ratio: float = 0.03,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> TrainResult:
    """Train `strategy`'s parameters on `data` with `model` frozen; save them as safetensors to `save`.

    Args:
        model: a supported VLM (not patched); its weights are never changed.
        strategy: a trainable strategy: "dyvte", "pmod" (p-MoD's routers, vtc/train/pmod.py) or "atp"
            (ATP's threshold modules, vtc/train/atp.py); `**options` go to the latter two.
        data: processed batches (dicts of model inputs + `labels`, -100 except on the answer at the end of
            each left-padded row) or raw samples: (image, question, answer) tuples or `vtc.data.make_scene_qa`
            dicts, encoded with `processor`'s chat template in batches of `batch_size`.
        steps: optimiser steps (None: one pass over `data`, as the paper; a list is re-read to reach `steps`).
        lr: AdamW learning rate; None takes the strategy's default (`DEFAULT_LR`: DyVTE's paper value 6e-5;
            1e-3 for p-MoD's and 3e-3 for ATP's small modules, ours: they train alone on a frozen VLM), no
            weight decay, `warmup_ratio` linear warm-up then cosine.
        save: a .safetensors path for `vtc.patch(model, strategy, weights=save)`.
        exit_layers: the layers k drawn at random per step (default 1 .. L-1).

    Returns a TrainResult (the trained strategy, the router loss per step, the drawn layers)."""
    from ..strategies.base import _normal

    if not isinstance(strategy, str) or _normal(strategy) not in TRAINABLE:
        raise ValueError(f"vtc.train trains {', '.join(TRAINABLE)}; got strategy={strategy!r}")
    if data is None:
        raise TypeError("vtc.train needs data=...: processed batches or (image, question, answer) samples")
    if lr is None:
        lr = DEFAULT_LR[_normal(strategy)]
    if _normal(strategy) == "pmod":  # p-MoD's routers: vtc/train/pmod.py (option: keep, the schedule)
        from .pmod import train_pmod

        return train_pmod(model, data, steps=steps, lr=lr, save=save, processor=processor, batch_size=batch_size,
                          warmup_ratio=warmup_ratio, seed=seed, progress=progress, **options)
    if _normal(strategy) == "atp":  # ATP's thresholds: vtc/train/atp.py (options: keep, layers, stride, ...)
        from .atp import train_atp

        return train_atp(model, data, steps=steps, lr=lr, save=save, processor=processor, batch_size=batch_size,
                         warmup_ratio=warmup_ratio, seed=seed, progress=progress, **options)
    if options:
        raise TypeError(f"vtc.train got options {sorted(options)} that strategy {strategy!r} does not take")
    return train_dyvte(model, data, steps=steps, lr=lr, save=save, processor=processor, batch_size=batch_size,
                       exit_layers=exit_layers, warmup_ratio=warmup_ratio, seed=seed, progress=progress)
