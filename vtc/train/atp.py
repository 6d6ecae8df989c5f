"""Training ATP's threshold modules (`vtc.train(model, strategy="atp", ...)`), the VLM frozen.

Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", CVPR 2025: the ATP modules
are trained with soft masks sigmoid(temperature * (score - threshold)) (the stride grid has mask 1) and a
budget loss, besides the language-modelling loss on the answer. Here (our choices, see
`vtc/strategies/atp.py`): every token stays in the sequence; the product of the masks so far acts in every
deeper decoder layer as log(mask) added to the attention logits for the visual keys (a forward pre-hook on
those layers, removed afterwards); loss = answer cross-entropy + budget_weight * (mean over the batch's
images of the decoder-layer-averaged soft visual fraction - target)^2, the target being what the fallback
schedule for `keep` realises (keep = 0.25: 144 of 576 at the last module). The paper fine-tunes the LLM
with the modules (LLaVA-665k); here only the modules learn.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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


@dataclass
class ATPTrainResult(TrainResult):
    """TrainResult plus, per step, the answer loss, the budget loss and the batch's soft visual fraction."""

    answer_losses: list[float] = field(default_factory=list)
    budget_losses: list[float] = field(default_factory=list)
    kept_fraction: list[float] = field(default_factory=list)
    target: float | None = None


def _soft_mask_hook(atp):
    """Forward pre-hook of a decoder layer: add the strategy's soft log-mask to the keys of its attention mask."""

    def hook(module, args, kwargs):
        bias, mask = atp._bias, kwargs.get("attention_mask")
        if bias is None or mask is None or mask.shape[-1] != bias.shape[-1]:
            return None
        allowed = mask if mask.dtype == torch.bool else mask == 0
        dtype = kwargs["position_embeddings"][0].dtype if mask.dtype == torch.bool else mask.dtype
        floor = torch.finfo(dtype).min
        kwargs["attention_mask"] = torch.where(allowed, bias[:, None, None, :].to(dtype), floor)
        return args, kwargs

    return hook


def soft_fraction(atp, num_layers: int) -> torch.Tensor:
    """(images,) decoder-layer-averaged soft visual fraction of each image (differentiable)."""
    stages = sorted({stage for stage, *_ in atp._kept})
    n_images = 1 + max(int(images.max()) for _, images, _, _ in atp._kept)
    device = atp._kept[0][2].device
    n = torch.zeros(n_images, device=device)
    for stage, images, _, tokens in atp._kept:
        if stage == stages[0]:
            n = n.index_put((images,), torch.full_like(images, tokens, dtype=n.dtype))
    total = n * stages[0]
    edges = [*stages, num_layers]
    for j, stage in enumerate(stages):
        count = torch.zeros(n_images, device=device)
        for s, images, kept, _ in atp._kept:
            if s == stage:
                count = count.index_add(0, images, kept)
        total = total + (edges[j + 1] - edges[j]) * count
    return total / (num_layers * n)


def train_atp(
    model: torch.nn.Module,
    data: Iterable,
    *,
    steps: int | None = None,
    lr: float = 1e-4,
    save: str | Path | None = None,
    processor=None,
    batch_size: int = 8,
    keep: float | int = 0.25,
    layers: list[int] | None = None,
    stride: int = 2,
    temperature: float = 10.0,
    budget_weight: float = 10.0,
    warmup_ratio: float = 0.03,
    seed: int = 0,
    progress: bool = True,
) -> ATPTrainResult:
    """Train ATP threshold modules on `data` with `model` frozen; save them as safetensors to `save`.

    `data`, `processor`, `batch_size`, `steps`, `save` as in `vtc.train` (raw samples need a processor with a
    chat template; otherwise pass processed batches with `labels`). `keep` sets the budget target (the
    layer-averaged visual fraction of the fallback schedule, e.g. 0.569 of N for keep=0.25 on a 4-layer
    decoder); `layers` the decoder layers of the modules (default: the paper's 4, 14, 24 of 32, scaled);
    `stride` the always-kept grid; `temperature` the soft masks' sharpness (10); `budget_weight` the weight
    of the squared budget error (ours: 10, so that it competes with the answer loss). AdamW, no weight decay,
    linear warm-up then cosine. Returns an ATPTrainResult: the trained strategy (usable in `vtc.patch`), the
    total, answer and budget losses and the soft visual fraction per step, the target, the saved path."""
    from tqdm.auto import tqdm

    from ..api import patch
    from ..budget import validate_keep
    from ..strategies.atp import ATP, default_layers, make_modules, save_modules

    validate_keep(keep)
    config = _text_config(model, steps)
    n_layers = config.num_hidden_layers
    layers = list(layers) if layers is not None else default_layers(n_layers)
    device = next(model.parameters()).device
    modules = make_modules(config.hidden_size, len(layers), seed=seed).to(device).train()
    atp = ATP.for_training(modules, keep, layers, stride, temperature)
    optimizer, scheduler, total = make_optimizer(modules.parameters(), lr, steps, data, processor, batch_size,
                                                 warmup_ratio)
    result = ATPTrainResult(strategy=atp)
    with _eval_mode(model):
        handle = patch(model, atp)
        decoder_layers = handle.adapter.language_model.layers[:n_layers]
        hooks = [
            decoder_layers[i].register_forward_pre_hook(_soft_mask_hook(atp), with_kwargs=True)
            for i in range(layers[0], n_layers)
        ]
        try:
            bar = tqdm(total=total, disable=not progress, desc="vtc.train atp")
            for batch in _stream(data, processor, batch_size, steps):
                batch, labels, tail = _answer_batch(batch, device)
                atp._tail, atp._kept, atp._bias = tail, [], None
                logits = model(**batch, use_cache=False).logits
                if logits.shape[1] != labels.shape[1] or not atp._kept:
                    raise ValueError("atp training needs every sample to have image tokens before its answer")
                answer_loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
                )
                fraction = soft_fraction(atp, n_layers)
                counts = [n for stage, _, _, n in atp._kept if stage == layers[0]]
                target = sum(atp.target_fraction(n, n_layers) for n in counts) / len(counts)
                budget_loss = (fraction.mean() - target) ** 2
                loss = answer_loss + budget_weight * budget_loss
                _optimizer_step(optimizer, scheduler, loss)
                result.losses.append(loss.item())
                result.answer_losses.append(answer_loss.item())
                result.budget_losses.append(budget_loss.item())
                result.kept_fraction.append(fraction.mean().item())
                result.target = target
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", kept=f"{result.kept_fraction[-1]:.3f}")
            bar.close()
        finally:
            for hook in hooks:
                hook.remove()
            atp._tail, atp._kept, atp._bias, atp._cache, atp.soft = None, [], None, None, False
            handle.unpatch()
    modules.eval()
    return _finish(result, save, lambda path: save_modules(modules, path, layers, n_layers, stride))
