"""Host-independent selection: vtc's strategy code on the tensors vLLM's embedding step has (no vLLM import).

The same `Strategy.select` that `vtc.patch` calls in transformers (vtc/adapters/decoder.py) runs here on each
image's projected features and vision probes; vLLM only hosts it.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from ...adapters.decoder import _as_selection
from ...strategies.base import VisualTokens


def select_images(
    settings: list[dict],
    features: torch.Tensor,
    grid: tuple[int, int],
    probes: dict[str, dict[int, torch.Tensor]],
    vision_layers: tuple[int, int],
    with_index: bool = False,
    has_cls: bool | None = None,
) -> list:
    """Each image's kept (or merged) features, (budget_i, D), in raster order; with `with_index`, per image the pair
    (the kept tokens' raster indices (budget_i,), sorted; for merged tokens the indices whose positions they take in
    vtc.patch, their features).

    settings: per image, the vtc settings of its request ({"strategy", "keep", **options}); features: (I, N, D)
    projected visual tokens of I images that share one grid; probes: kind -> vision layer -> (I, C, N) rows, as
    vtc.patch's adapters give them (a superset: each strategy sees the layers it asks for); vision_layers: (layers
    of the tower, the 0-based feature layer); has_cls: whether the tower has a [CLS] token (see `make_strategy`).
    Images with equal settings are selected together. Every image is its own sample (image 0 of its prompt): vLLM's
    encoder cache shares an image's embedding across prompts, so a selection may depend on the image alone."""
    from . import make_strategy, served_budget

    out: list = [None] * features.shape[0]
    device, n_tokens = features.device, features.shape[1]
    for key in sorted({json.dumps(s, sort_keys=True) for s in settings}):
        strategy = make_strategy(json.loads(key), has_cls)
        rows = torch.tensor([i for i, s in enumerate(settings) if json.dumps(s, sort_keys=True) == key], device=device)
        n_images = len(rows)
        asked = strategy.vision_probes(*vision_layers)
        by_kind = {kind: {layer: probes[kind][layer][rows] for layer in layers} for kind, layers in asked.items()}
        budget = served_budget(strategy, n_tokens)
        visual = VisualTokens(
            features=features[rows],
            grid=grid,
            budget=budget,
            cls_attention=by_kind.get("cls", {}),
            received_attention=by_kind.get("received", {}),
            vision=by_kind,
            image_index=torch.arange(n_images, device=device),
            token_ids=torch.arange(n_tokens, device=device).expand(n_images, -1),
            context=dict(layout=SimpleNamespace(sample_of_image=list(range(n_images)), extras={}), vision=by_kind),
        )
        index, merged = _as_selection(strategy.select(visual))
        if index.dtype == torch.bool:  # a keep-mask (HiRED): equal counts here, as indices
            if not bool((index.sum(1) == budget).all()):
                raise RuntimeError(f"{strategy.describe()} kept {index.sum(1).tolist()} tokens, not {budget} each")
            index = torch.arange(n_tokens, device=device).expand(n_images, -1)[index].view(n_images, budget)
            merged = merged[torch.arange(n_images, device=device)[:, None], index] if merged is not None else None
        if index.shape[1] != budget:
            raise RuntimeError(f"{strategy.describe()} kept {index.shape[1]} tokens per image, not {budget}")
        kept = (
            merged
            if merged is not None
            else visual.features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))
        )
        for row, image in enumerate(rows.tolist()):
            out[image] = (index[row], kept[row]) if with_index else kept[row]
    return out
