"""`vtc.train`: train a strategy's own parameters with the VLM frozen (DyVTE's routers here; p-MoD's routers
and ATP's threshold modules in vtc/train_pmod.py and vtc/train_atp.py).

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

import contextlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

TRAINABLE = ("dyvte", "atp", "pmod")
IGNORE = -100
DEFAULT_LR = {"dyvte": 6e-5, "pmod": 1e-3, "atp": 3e-3}


@dataclass
class TrainResult:
    """What `vtc.train` did: the trained strategy, the loss and label statistics per step, the saved path."""

    strategy: object
    losses: list[float] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    exit_fraction: list[float] = field(default_factory=list)  # share of label-1 ("exit") samples per step
    path: Path | None = None


def _raw_sample(item) -> tuple | None:
    """(image, question, answer) from a tuple or a dict with those keys (vtc.data samples), else None."""
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return tuple(item)
    if isinstance(item, dict) and {"image", "question", "answer"} <= set(item) and "input_ids" not in item:
        return item["image"], item["question"], item["answer"]
    return None


def _encode(processor, image, question: str, answer: str) -> dict:
    """One sample through the processor's chat template: prompt + answer + eos, labels on the answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(images=[image], text=[prompt], return_tensors="pt"))
    tokenizer = processor.tokenizer
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    answer = torch.tensor([answer_ids], dtype=inputs["input_ids"].dtype)
    inputs["labels"] = torch.cat([torch.full_like(inputs["input_ids"], IGNORE), answer], dim=1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def _collate(samples: list[dict], pad_id: int) -> dict:
    """Left-pad input_ids / attention_mask / labels; concatenate every other tensor along dim 0."""
    length = max(s["input_ids"].shape[1] for s in samples)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE)):
        rows = [s[key] for s in samples]
        out[key] = torch.cat([torch.nn.functional.pad(r, (length - r.shape[1], 0), value=fill) for r in rows])
    for key in samples[0]:
        if key not in out and isinstance(samples[0][key], torch.Tensor):
            out[key] = torch.cat([s[key] for s in samples])
    return out


def _batches(data: Iterable, processor, batch_size: int):
    """Processed batches from processed dicts (used as they are) or raw (image, question, answer) samples."""
    pending = []
    for item in data:
        raw = _raw_sample(item)
        if raw is None:
            if not isinstance(item, dict) or "input_ids" not in item or "labels" not in item:
                raise TypeError(
                    "vtc.train data items are processed batches (dicts with input_ids, attention_mask, "
                    "pixel_values and labels: -100 except on the answer tokens at the end) or raw samples "
                    "(image, question, answer) / vtc.data.make_scene_qa dicts, which need processor=..."
                )
            yield dict(item)
            continue
        if processor is None:
            raise TypeError("raw (image, question, answer) samples need vtc.train(..., processor=<model's processor>)")
        pending.append(_encode(processor, *raw))
        if len(pending) == batch_size:
            yield _collate(pending, processor.tokenizer.pad_token_id or 0)
            pending = []
    if pending:
        yield _collate(pending, processor.tokenizer.pad_token_id or 0)


def _stream(data, processor, batch_size: int, steps: int | None):
    """Batches for `steps` steps: one epoch when steps is None; re-reads a re-iterable `data` to go on."""
    done = 0
    while steps is None or done < steps:
        seen = 0
        for batch in _batches(data, processor, batch_size):
            yield batch
            seen += 1
            done += 1
            if steps is not None and done >= steps:
                return
        if steps is None or seen == 0 or iter(data) is data:
            return


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


def make_optimizer(params, lr: float, steps: int | None, data, processor, batch_size: int, warmup_ratio: float):
    """AdamW (no weight decay) with linear warm-up then cosine decay over the run; returns (optimizer,
    scheduler, total steps or None when `data` has no length and `steps` is None)."""
    import math

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = steps
    if total is None and hasattr(data, "__len__"):
        total = len(data) if processor is None else -(-len(data) // batch_size)
    warmup = max(1, round(warmup_ratio * total)) if total else 1

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not total:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), total


def _text_config(model: torch.nn.Module, steps: int | None):
    """Fail early for a patched model or steps < 1; the model's text config (its decoder's sizes)."""
    from .api import _ACTIVE

    if model in _ACTIVE:
        raise RuntimeError("vtc.train needs the unpatched model: call handle.unpatch() first")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps}: pass a positive number of steps, or None for one pass over data")
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _answer_batch(batch: dict, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A training batch on `device`: (the model inputs, labels, tail = each row's answer tokens, and anything
    after the first, at its end); fails when a sample has no answer token."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels = batch.pop("labels")
    answer = labels != IGNORE
    if not bool(answer.any(1).all()):
        raise ValueError("every sample needs answer tokens: labels other than -100 at the end of its row")
    first = torch.where(answer, torch.arange(labels.shape[1], device=device), labels.shape[1]).min(1).values
    return batch, labels, labels.shape[1] - first


def _optimizer_step(optimizer, scheduler, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, freeze: bool = True):
    """The model in eval mode for the block (with `freeze`, every parameter's requires_grad off too); afterwards
    its training mode and each parameter's requires_grad as they were."""
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    if freeze:
        model.requires_grad_(False)
    try:
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def _finish(result: TrainResult, save: str | Path | None, write) -> TrainResult:
    """Fail when no step ran; else `write(path)` the trained weights to `save` (when given) and return `result`."""
    if not result.losses:
        raise ValueError("vtc.train got no data: pass at least one sample")
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        write(save)
        result.path = save
    return result


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
        strategy: a trainable strategy: "dyvte", "pmod" (p-MoD's routers, vtc/train_pmod.py) or "atp"
            (ATP's threshold modules, vtc/train_atp.py); `**options` go to the latter two.
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
    from tqdm.auto import tqdm

    from .api import patch
    from .strategies.base import _normal
    from .strategies.dyvte import DyVTE, make_routers, save_routers

    if not isinstance(strategy, str) or _normal(strategy) not in TRAINABLE:
        raise ValueError(f"vtc.train trains {', '.join(TRAINABLE)}; got strategy={strategy!r}")
    if data is None:
        raise TypeError("vtc.train needs data=...: processed batches or (image, question, answer) samples")
    if lr is None:
        lr = DEFAULT_LR[_normal(strategy)]
    if _normal(strategy) == "pmod":  # p-MoD's routers: vtc/train_pmod.py (option: keep, the schedule)
        from .train_pmod import train_pmod

        return train_pmod(model, data, steps=steps, lr=lr, save=save, processor=processor, batch_size=batch_size,
                          warmup_ratio=warmup_ratio, seed=seed, progress=progress, **options)
    if _normal(strategy) == "atp":  # ATP's thresholds: vtc/train_atp.py (options: keep, layers, stride, ...)
        from .train_atp import train_atp

        return train_atp(model, data, steps=steps, lr=lr, save=save, processor=processor, batch_size=batch_size,
                         warmup_ratio=warmup_ratio, seed=seed, progress=progress, **options)
    if options:
        raise TypeError(f"vtc.train got options {sorted(options)} that strategy {strategy!r} does not take")
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
