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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def project_qk(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, heads, Q, d) and k (B, kv_heads, L, d) of a Llama/Qwen2/Mistral decoder layer, RoPE applied, in
    fp32: what the layer's attention computes from its input `hidden_states` (before input_layernorm).

    query_index (B, Q): physical indices of the query rows to project (default: all L tokens)."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    b, length, _ = normed.shape
    cos, sin = (t.float() for t in position_embeddings)
    rows, cos_q, sin_q = normed, cos, sin
    if query_index is not None:
        rows, cos_q, sin_q = (
            t.gather(1, query_index[..., None].expand(-1, -1, t.shape[-1])) for t in (normed, cos, sin)
        )
    q = attn.q_proj(rows).view(b, rows.shape[1], -1, attn.head_dim)
    k = attn.k_proj(normed).view(b, length, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    q = q * cos_q[:, None] + rotate_half(q) * sin_q[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    return q, k


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
    q, k = project_qk(layer, hidden_states, position_embeddings, query_index)
    length = k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)

    scores = (q @ k.transpose(-1, -2)) * layer.self_attn.scaling  # (B, H, Q, L)
    key_pos = torch.arange(length, device=k.device)
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


def vit_cls_attention_single_head(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, 1, N) attention of the [CLS] query to every key with all heads concatenated into ONE head: softmax of
    q_cls . k_j / sqrt(D) over the full projections (D = hidden size). LLaVA-PruMerge's score
    (clip_encoder.py: `desired_layer_q @ desired_layer_k.transpose(-2, -1) * C ** -0.5`)."""
    q = attn.q_proj(hidden_states[:, :1]).float()
    k = attn.k_proj(hidden_states).float()
    return ((q @ k.transpose(-1, -2)) * k.shape[-1] ** -0.5).softmax(dim=-1)


def vit_keys_concat(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, D, N) keys of a ViT attention layer with all heads concatenated (the raw k_proj output), tokens LAST.
    LLaVA-PruMerge's merge metric (`desired_layer_k`)."""
    return attn.k_proj(hidden_states).transpose(1, 2)
