"""What every `vtc.train` trainer shares: data encoding and batching, the optimiser and its schedule, the frozen
model's mode, the answer tokens of a batch, saving."""

from __future__ import annotations

import contextlib
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
    from ..api import _ACTIVE

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
