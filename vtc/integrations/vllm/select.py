"""Host-independent selection: vtc's strategy code on the tensors vLLM's embedding step has (no vLLM import).

The same `Strategy.select` that `vtc.patch` calls in transformers (vtc/adapters/decoder.py) runs here on each
image's projected features and vision probes; vLLM only hosts it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ...adapters.decoder import _as_selection
from ...strategies.base import Strategy, VisualTokens


def select_images(
    strategy: Strategy,
    features: torch.Tensor,
    grid: tuple[int, int],
    budgets: list[int],
    probes: dict[str, dict[int, torch.Tensor]],
) -> list[torch.Tensor]:
    """Each image's kept (or merged) features, (budget_i, D), in raster order.

    features: (I, N, D) projected visual tokens of I images that share one grid; budgets: tokens kept per image
    (engine-wide or per request); probes: kind -> vision layer -> (I, C, N) rows, as vtc.patch's adapters give
    them. Images with equal budgets are selected together. Every image is its own sample (image_index 0 of its
    prompt): vLLM's encoder cache shares an image's embedding across prompts, so a selection may depend on the
    image alone."""
    out: list[torch.Tensor | None] = [None] * features.shape[0]
    for budget in sorted(set(budgets)):
        rows = torch.tensor([i for i, b in enumerate(budgets) if b == budget], device=features.device)
        n_images, n_tokens = len(rows), features.shape[1]
        by_kind = {kind: {layer: v[rows] for layer, v in layers.items()} for kind, layers in probes.items()}
        visual = VisualTokens(
            features=features[rows],
            grid=grid,
            budget=budget,
            cls_attention=by_kind.get("cls", {}),
            received_attention=by_kind.get("received", {}),
            vision=by_kind,
            image_index=torch.arange(n_images, device=features.device),
            token_ids=torch.arange(n_tokens, device=features.device).expand(n_images, -1),
            context=dict(layout=SimpleNamespace(sample_of_image=list(range(n_images))), vision=by_kind),
        )
        index, merged = _as_selection(strategy.select(visual))
        if index.dtype == torch.bool:
            raise ValueError(f"strategy {strategy.name!r} returned a keep-mask (an adaptive budget): not servable")
        kept = merged if merged is not None else visual.features.gather(
            1, index[..., None].expand(-1, -1, features.shape[-1])
        )
        for row, image in enumerate(rows.tolist()):
            out[image] = kept[row]
    return out
