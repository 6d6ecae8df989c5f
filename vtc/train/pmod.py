"""`vtc.train(model, "pmod", ...)`: train p-MoD's routers with the VLM frozen.

    result = vtc.train(model, strategy="pmod", data=samples, processor=processor, steps=200, lr=1e-3,
                       save="pmod.safetensors")
    handle = vtc.patch(model, strategy="pmod", weights="pmod.safetensors")

The paper (Zhang et al., p-MoD, MCG-NJU/p-MoD) fine-tunes the whole MLLM together with the routers (LLaVA
instruction tuning, lr 2e-5). Here only the routers learn: one zero-initialised Linear(d -> 1, bias) per
routed layer of the schedule (`keep`, see `vtc/strategies/pmod.py`); every weight of the VLM stays as it
is. The loss is the LM cross-entropy on the answer tokens of the patched model, whose graph holds the
routers through the TanhNorm weights w (the MLP branch of the routed tokens is scaled by w, a skipped token
leaves as w * x); the top-k choice itself is not differentiable, as in the paper. AdamW, no weight decay,
linear warm-up then cosine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .base import (
    IGNORE,
    TrainResult,
    _answer_batch,
    _eval_mode,
    _finish,
    _optimizer_step,
    _stream,
    _text_config,
    make_optimizer,
)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on the answer tokens (labels != -100), logits and labels aligned."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def train_pmod(
    model: torch.nn.Module,
    data: Iterable,
    *,
    steps: int | None = None,
    lr: float = 1e-3,
    save: str | Path | None = None,
    processor=None,
    batch_size: int = 8,
    keep: float | None = None,
    ratios: dict[int, float] | None = None,
    warmup_ratio: float = 0.03,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train the routers of `PMoD(keep)` (or `PMoD(ratios=...)`) on `data` (see `vtc.train` for data, steps,
    lr, save); the VLM stays frozen. Patch with the same keep / ratios as trained (the routed layers must have
    routers). Returns a TrainResult (the trained strategy, the answer loss per step, the saved path)."""
    from tqdm.auto import tqdm

    from ..api import patch
    from ..strategies.pmod import PMoD, make_routers, save_routers

    config = _text_config(model, steps)
    probe = PMoD.with_routers(torch.nn.ModuleDict(), keep, ratios)
    layers = sorted(probe.layer_ratios(config.num_hidden_layers))
    if not layers:
        raise ValueError(f"keep={keep}, ratios={ratios} route no decoder layer: nothing to train (pass keep < 1)")
    device = next(model.parameters()).device
    routers = make_routers(config.hidden_size, layers).to(device).train()
    pmod = PMoD.with_routers(routers, keep, ratios)
    optimizer, scheduler, total = make_optimizer(routers.parameters(), lr, steps, data, processor, batch_size,
                                                 warmup_ratio)
    torch.manual_seed(seed)
    result = TrainResult(strategy=pmod)
    with _eval_mode(model):
        handle = patch(model, pmod)
        try:
            bar = tqdm(total=total, disable=not progress, desc="vtc.train pmod")
            for batch in _stream(data, processor, batch_size, steps):
                batch, labels, _ = _answer_batch(batch, device)
                logits = model(**batch, use_cache=False).logits
                if logits.shape[1] != labels.shape[1]:
                    raise ValueError("pmod training needs one logit row per input token (compose no pruning strategy)")
                loss = answer_loss(logits, labels)
                _optimizer_step(optimizer, scheduler, loss)
                result.losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            bar.close()
        finally:
            handle.unpatch()
    routers.eval().requires_grad_(False)
    return _finish(result, save, lambda path: save_routers(routers, path))
