"""Attention rows computed from q and k at one layer: only the rows a strategy needs.

Never `output_attentions`: that forces eager attention and materialises every (N x N) map. A probe
recomputes the few query rows it needs from the layer's own projections, so SDPA stays on and the cost
is O(rows x N) per head.
"""

from __future__ import annotations

import torch


def vit_cls_attention(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, heads, N) attention of the [CLS] query (position 0) to every key of a ViT attention layer.

    `attn` is a CLIP/SigLIP-style attention module (q_proj, k_proj, num_heads, head_dim, scale) and
    `hidden_states` its input (already layer-normed), shape (B, N, D). Softmax over all N keys."""
    b, n, _ = hidden_states.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(hidden_states[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(b, n, heads, head_dim).transpose(1, 2)
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scale
    return scores.softmax(dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def decoder_attention_rows(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Attention of a few query rows at a Llama/Qwen2/Mistral-style decoder layer, averaged over heads.

    hidden_states: (B, L, D) input of the layer (before its input_layernorm).
    position_embeddings: (cos, sin), each (B, L, head_dim), as the layer receives them.
    query_index: (B, Q) physical indices of the query tokens.
    key_valid: (B, L) bool, False for padding.
    Returns (B, Q, L): softmax over the causal row (keys at index <= the query's), mean over heads.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    b, length, _ = normed.shape
    head_dim = attn.head_dim
    cos, sin = position_embeddings

    rows = normed.gather(1, query_index[..., None].expand(-1, -1, normed.shape[-1]))
    q = attn.q_proj(rows).view(b, rows.shape[1], -1, head_dim)
    k = attn.k_proj(normed).view(b, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    cos_q = cos.gather(1, query_index[..., None].expand(-1, -1, cos.shape[-1]))
    sin_q = sin.gather(1, query_index[..., None].expand(-1, -1, sin.shape[-1]))
    q = q * cos_q[:, None].float() + _rotate_half(q) * sin_q[:, None].float()
    k = k * cos[:, None].float() + _rotate_half(k) * sin[:, None].float()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)

    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, H, Q, L)
    key_pos = torch.arange(length, device=normed.device)
    # a padding query sees only itself: no empty softmax row (NaN) when rows of all tokens are asked for
    allowed = key_valid[:, None, :] & (key_pos[None, None, :] <= query_index[..., None])
    allowed |= key_pos[None, None, :] == query_index[..., None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def vit_attention_received(
    attn: torch.nn.Module, hidden_states: torch.Tensor, chunk: int = 256, first_query: int = 1
) -> torch.Tensor:
    """(B, heads, N) attention each token receives, averaged over the queries first_query..N-1: by default
    the [CLS] query (position 0) is excluded; `first_query=0` for towers without [CLS] (SigLIP).

    Computed in chunks of `chunk` query rows, so the (N x N) map is never materialised whole."""
    b, n, _ = hidden_states.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(hidden_states).view(b, n, heads, head_dim).transpose(1, 2).float()
    k = attn.k_proj(hidden_states).view(b, n, heads, head_dim).transpose(1, 2).float()
    total = torch.zeros(b, heads, n, device=hidden_states.device)
    for start in range(first_query, n, chunk):
        rows = q[:, :, start : start + chunk]
        total += ((rows @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1).sum(dim=2)
    return total / max(n - first_query, 1)


def vit_keys(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, head_dim, N) keys of a ViT attention layer averaged over heads, tokens LAST (like the other probes).

    The matching metric of ToMe (tome/patch/timm.py: `k.mean(1)`) and VisionZip (visionzip/utils.py:
    `raw_key_states.mean(1)`). `hidden_states` is the layer's attention input (already layer-normed), (B, N, D)."""
    b, n, _ = hidden_states.shape
    keys = attn.k_proj(hidden_states).view(b, n, attn.num_heads, attn.head_dim)
    return keys.mean(dim=2).transpose(1, 2)
