"""What `keep` means, its validation, and the FLOPs estimate behind the report.

`keep` is either a float in (0, 1] (the fraction of each image's visual tokens that is kept) or an int
(the number of tokens kept per image). Every image, crop or frame gets its own quota, so no image starves
in a multi-image prompt.
"""

from __future__ import annotations

import numbers


def validate_keep(keep: float | int, max_tokens: int | None = None) -> None:
    """Raise a ValueError naming the fix when `keep` is not a valid budget."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a float in (0, 1] or an int token count, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep={keep}: pass a fraction in (0, 1] (e.g. 0.25) or a token count per image >= 1")
        if max_tokens is not None and keep > max_tokens:
            raise ValueError(
                f"keep={keep} tokens is above the {max_tokens} visual tokens per image of this model; "
                f"pass an int <= {max_tokens} or a fraction in (0, 1]"
            )
        return
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(
            f"keep={keep}: a float keep is the fraction of visual tokens kept and must lie in (0, 1] "
            "(e.g. keep=0.25), or pass an int token count per image >= 1"
        )


def tokens_to_keep(keep: float | int, n_tokens: int) -> int:
    """Number of tokens kept out of `n_tokens`: round(n * keep) for a fraction (at least 1), or the int."""
    if n_tokens == 0:
        return 0
    if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
        if keep > n_tokens:
            raise ValueError(
                f"keep={keep} tokens is above the {n_tokens} visual tokens of this image; "
                f"pass an int <= {n_tokens} or a fraction in (0, 1]"
            )
        return int(keep)
    return min(n_tokens, max(1, int(n_tokens * float(keep) + 0.5)))


def decoder_layer_flops(config, n_query: int, n_key: int) -> float:
    """Multiply-adds x 2 of one Llama-style decoder layer: projections and MLP on n_query tokens,
    attention scores and weighted sum of n_query rows over n_key keys."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    proj = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o, k, v
    mlp = 3 * d * config.intermediate_size
    attention = 2 * heads * head_dim * n_key  # q.k and p.v, per query
    return 2.0 * n_query * (proj + mlp) + 2.0 * n_query * attention


def prefill_flops(config, tokens_per_layer: list[int]) -> float:
    """Decoder prefill FLOPs when layer l sees tokens_per_layer[l] tokens (causal attention: n^2 / 2 keys)."""
    return sum(decoder_layer_flops(config, n, (n + 1) / 2) for n in tokens_per_layer)
