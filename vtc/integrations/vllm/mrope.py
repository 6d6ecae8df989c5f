"""M-RoPE positions of a shortened prompt (Qwen-VL), host-independent (no vLLM import).

vtc.patch keeps each kept visual token's original (t, h, w) position and the text its original positions. In vLLM
the prompt is short before the model runs, so the positions are set in two steps:
- at request time (`prompt_positions`): every text token gets its original position (an image advances the text
  by max(t, h, w) of its token grid, as in the unshortened prompt); each image token gets its image's base
  position on all three axes (the position after the vision-start token);
- in the model's step, once the image is encoded: each kept token adds its (t, h, w) offset in the grid, which
  travels with its embedding as extra channels (as in vLLM's EVS video pruning), through the encoder cache and
  chunked prefill's slicing (`kept_offsets`, `split_offsets`).
"""

from __future__ import annotations

import torch

OFFSET_CHANNELS = 3  # (t, h, w) offset of each kept token in its image's grid, appended to its embedding


def prompt_positions(n_tokens: int, spans: list[tuple[int, int, tuple[int, int, int]]]) -> tuple[torch.Tensor, int]:
    """(3, n_tokens) positions and the rope delta of a prompt whose media spans are (offset, length, token grid
    (t, h, w)), sorted by offset: text consecutive, each media token at its media's base, a media advances the next
    text by max(t, h, w). The delta is (last position + 1) - n_tokens, as vLLM's own M-RoPE models define it."""
    positions = torch.empty(n_tokens, dtype=torch.long)
    next_pos, start = 0, 0
    for offset, length, grid in spans:
        text = offset - start
        positions[start:offset] = torch.arange(next_pos, next_pos + text)
        base = next_pos + text
        positions[offset : offset + length] = base
        next_pos, start = base + max(grid), offset + length
    positions[start:] = torch.arange(next_pos, next_pos + n_tokens - start)
    end = next_pos + n_tokens - start
    return positions.expand(3, -1).clone(), end - n_tokens


def kept_offsets(index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(k, 3) float (t, h, w) offsets of kept raster indices `index` (k,) in an image's (h, w) token grid."""
    width = grid[1]
    return torch.stack([torch.zeros_like(index), index // width, index % width], dim=1).to(torch.float32)


def add_offsets(positions: torch.Tensor, is_media: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """positions (3, T) with each media token (is_media (T0,) over the first T0 <= T tokens) moved by its offset
    (n_media, 3); a new tensor."""
    moved = positions.clone()
    index = is_media.nonzero().squeeze(1)
    moved[:, index] += offsets.round().long().to(positions.device).T
    return moved
