"""`vtc.train(model, "dyvte", ...)`: train DyVTE's routers with the VLM frozen.

    result = vtc.train(model, strategy="dyvte", data=samples, processor=processor, steps=200, save="dyvte.safetensors")
    handle = vtc.patch(model, strategy="dyvte", weights="dyvte.safetensors")

DyVTE labels, as in the official code (DoubtedSteam/DyVTE, `LlavaLlamaForCausalLM.forward`): each step draws
one exit layer k at random; the frozen model runs the batch (prompt + answer) once with every visual token
and once with all of them removed from layer k on; a sample's label is 1 ("exit") iff the greedy
predictions on its answer tokens agree on more than 99% of them with the full run AND its answer loss is
below 1.03x the full run's. The router of layer k (its input: the text hidden states of the prompt, see
`vtc.strategies.dyvte.router_features`) is trained with cross-entropy on that label. Paper setting: 1% of
LLaVA-665k (single-turn image samples), 1 epoch, AdamW, lr 6e-5, no weight decay, 3% warm-up + cosine,
batch 128. Here k is a layer before which the loop drops tokens, 1 .. L-1 (router k-1 decides there).
"""

from __future__ import annotations

import random
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


def _answer_stats(logits: torch.Tensor, labels: torch.Tensor, tail: torch.Tensor):
    """Per sample: (mean CE on its answer tokens, greedy predictions there) from the last tail+1 rows."""
    losses, predictions = [], []
    for b in range(labels.shape[0]):
        width = int(tail[b]) + 1
        rows = logits[b, -width:-1].float()
        target = labels[b, -width + 1 :]
        mask = target != IGNORE
        losses.append(torch.nn.functional.cross_entropy(rows[mask], target[mask]))
        predictions.append(rows[mask].argmax(-1))
    return torch.stack(losses), predictions


def exit_labels(full, exited, labels, tail, agreement: float = 0.99, loss_ratio: float = 1.03) -> torch.Tensor:
    """(B,) long: 1 iff the answer's greedy predictions agree > `agreement` with the full run and the answer
    loss is below `loss_ratio` x the full run's (the official thresholds)."""
    full_loss, full_pred = _answer_stats(full, labels, tail)
    exit_loss, exit_pred = _answer_stats(exited, labels, tail)
    agree = torch.stack([(a == b).float().mean() for a, b in zip(full_pred, exit_pred)])
    return ((agree > agreement) & (exit_loss < loss_ratio * full_loss)).long()



def train_dyvte(
    model: torch.nn.Module,
    data: Iterable,
    *,
    steps: int | None = None,
    lr: float = 6e-5,
    save: str | Path | None = None,
    processor=None,
    batch_size: int = 8,
    exit_layers: list[int] | None = None,
    warmup_ratio: float = 0.03,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train DyVTE's routers on `data` (see `vtc.train` for data, steps, lr, save, exit_layers); the VLM stays
    frozen. Returns a TrainResult (the trained strategy, the router loss per step, the drawn layers)."""
    from tqdm.auto import tqdm

    from ..api import patch
    from ..strategies.dyvte import DyVTE, make_routers, save_routers

    config = _text_config(model, steps)
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    layers = list(exit_layers) if exit_layers is not None else list(range(1, n_layers))
    if not layers or any(not 1 <= k < n_layers for k in layers):
        raise ValueError(f"exit_layers={exit_layers}: pass layers in [1, {n_layers - 1}]")
    device = next(model.parameters()).device
    routers = make_routers(hidden, n_layers, seed=seed).to(device).train()
    dyvte = DyVTE.with_routers(routers)
    optimizer, scheduler, total = make_optimizer(routers.parameters(), lr, steps, data, processor, batch_size,
                                                 warmup_ratio)
    rng = random.Random(seed)
    result = TrainResult(strategy=dyvte)
    with _eval_mode(model, freeze=False):
        handle = patch(model, dyvte)
        try:
            bar = tqdm(total=total, disable=not progress, desc="vtc.train dyvte")
            for batch in _stream(data, processor, batch_size, steps):
                batch, labels, tail = _answer_batch(batch, device)
                k = rng.choice(layers)
                with torch.no_grad():
                    dyvte._tail, dyvte._record, dyvte._force = tail, {}, None
                    full = model(**batch).logits
                    record = dyvte._record
                    dyvte._record, dyvte._force = None, k
                    exited = model(**batch).logits
                if k not in record or bool((record["visual_tail"] < tail + 1).any()):
                    raise ValueError("each sample's answer must come after its images and at least one prompt token")
                target = exit_labels(full, exited, labels, tail)
                logits = routers[k - 1](record[k].detach())
                loss = torch.nn.functional.cross_entropy(logits, target)
                _optimizer_step(optimizer, scheduler, loss)
                result.losses.append(loss.item())
                result.exit_layers.append(k)
                result.exit_fraction.append(float(target.float().mean()))
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", layer=k, exit=f"{result.exit_fraction[-1]:.2f}")
            bar.close()
        finally:
            dyvte._tail, dyvte._record, dyvte._force = None, None, None
            handle.unpatch()
    routers.eval()
    return _finish(result, save, lambda path: save_routers(routers, path))
