"""DART: keep the visual tokens that duplicate the pivot tokens least, inside the LLM.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv:2502.11494 (github.com/ZichenWen1/DART). As in the official LLaVA code (the `DART` pruning class of
llava/model/language_model/modeling_llama_self.py and its `get_retained_image_token`; we read the same
function in LightCompress, ModelTC/llmc, llmc/compression/token_reduction/dart.py):

- Pruning happens before decoder layer K (default 2); layers K.. run on the shorter sequence.
- Pivots: the `pivot_image` (4) image tokens and the `pivot_text` (4) text tokens after the image with the
  largest L1 norm of the keys of layer K-1 (`K_states`, all heads concatenated). The official code reads
  them from the KV cache, i.e. after RoPE (`rope=True`, default; `rope=False` uses the keys before RoPE).
  RoPE is applied at positions counted from each sample's first valid token (so that a left-padded batch
  selects what each sample alone selects: post-RoPE L1 norms are not shift-invariant).
- Similarity: cosine between the output of layer K-1 passed through the model's final norm
  (`self.norm(layer_outputs[0])`) of each pivot and each image token.
- Each pivot in turn adds the not-yet-chosen image tokens LEAST similar to it; image pivots are kept, text
  pivots are not (`indices_set.difference_update(query_indices)`); kept tokens keep their original order and
  position ids. Selection is `vtc.ops.duplication_select`.
- Official default: 128 of 576 tokens asked (scripts: reduction ratio 0.778, max_num_trunction 128), hence
  keep = 128 / 576.

Two choices of ours by default, each with the official behaviour as an option:

- `budget="exact"` (default): the image pivots count in the budget and the k - #pivots other slots are split
  over the pivots as evenly as possible, so exactly k tokens stay. `budget="official"`: every pivot adds
  k // (pivot_image + pivot_text) tokens on top of the image pivots (`TOKEN_TOPK`): 128 asked -> 132 kept.
- `pivot_order="norm"` (default): image pivots by decreasing key norm, then text pivots by decreasing key
  norm. `pivot_order="official"`: the order in which CPython iterates `set(image_indices + query_indices)`,
  the pivots' indices in the sample's sequence (deterministic for ints, but an implementation detail); it
  reads 8 indices per image to the host.
  Measured (`python eval/dart_fidelity.py --n 40`: the trained tiny VLM, 196 tokens per image, layer 2, 40
  held-out questions, one run): Jaccard index of the kept sets, default vs the official rule (both options),
  mean (min): keep 128/576 (44 tokens either way) 0.81 (0.66); keep 0.25 (49 vs 52 tokens) 0.81 (0.66);
  keep 0.1 (20 tokens) 0.88 (0.74). The pivot order alone accounts for nearly all of it (0.81 / 0.82 / 0.88);
  the budget alone changes only the count (0.94 at keep 0.25, where 49 vs 52).

Also ours: text pivots are the sample's text tokens after the image's last token (the official code takes
every token after the image span; with several images we skip the other images' tokens). If a budget is
smaller than 8, image pivots come first (min(4, k)), then text pivots while slots remain; with no text after
the image, only image pivots are used (the official `topk(4)` would fail on fewer than 4 text tokens).
"""

from __future__ import annotations

import torch

from .. import ops
from ..probes import rotate_half
from .base import Strategy, VisualTokens, register_strategy


def rotated_keys(keys: torch.Tensor, lm: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
    """(B, L, kv_heads * head_dim) keys before RoPE -> after RoPE at `positions` (as the KV cache holds them)."""
    b, length, channels = keys.shape
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    cos, sin = lm.rotary_emb(hidden, positions)  # (B, L, head_dim)
    k = keys.view(b, length, channels // head_dim, head_dim).float()
    k = k * cos[:, :, None].float() + rotate_half(k) * sin[:, :, None].float()
    return k.reshape(b, length, channels)


def key_l1_norm(keys: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's keys over all heads: (B, L, C) -> (B, L) (`torch.norm(k, p=1, dim=-1)`)."""
    return keys.float().abs().sum(dim=-1)


def pivot_counts(k: int, n_text: int, pivot_image: int = 4, pivot_text: int = 4) -> tuple[int, int]:
    """(image pivots, text pivots) for a budget of k tokens with n_text text tokens available."""
    n_img = min(pivot_image, k)
    return n_img, max(0, min(pivot_text, n_text, k - n_img))


@register_strategy
class DART(Strategy):
    name = "dart"
    stage = "llm"
    paper = "Wen et al., arXiv:2502.11494"
    default_keep = 128 / 576
    needs_keys = True

    def __init__(
        self,
        keep: float | int = 128 / 576,
        layer: int = 2,
        pivot_image: int = 4,
        pivot_text: int = 4,
        rope: bool = True,
        budget: str = "exact",
        pivot_order: str = "norm",
    ):
        super().__init__(keep)
        if pivot_image < 1 or pivot_text < 0:
            raise ValueError("DART needs pivot_image >= 1 and pivot_text >= 0")
        if budget not in ("exact", "official"):
            raise ValueError(f"DART budget must be 'exact' or 'official', got {budget!r}")
        if pivot_order not in ("norm", "official"):
            raise ValueError(f"DART pivot_order must be 'norm' or 'official', got {pivot_order!r}")
        self.llm_layer = int(layer)
        self.pivot_image, self.pivot_text, self.rope = int(pivot_image), int(pivot_text), bool(rope)
        self.budget_mode, self.pivot_order = budget, pivot_order

    def describe(self) -> str:
        extra = "".join(f", {k}=official" for k, v in (("budget", self.budget_mode), ("order", self.pivot_order))
                        if v == "official")
        return f"dart(K={self.llm_layer}, keep={self.keep}, pivots={self.pivot_image}+{self.pivot_text}{extra})"

    def kept_count(self, k: int, n: int, n_img: int, n_txt: int) -> int:
        """Tokens kept: k (`budget="exact"`), or the image pivots + k // 8 per pivot (official `TOKEN_TOPK`)."""
        if self.budget_mode == "exact":
            return k
        return min(n, n_img + (n_img + n_txt) * (k // (self.pivot_image + self.pivot_text)))

    def select(self, visual: VisualTokens) -> torch.Tensor:
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        context = visual.context
        seq, probe, lm = context["sequence"], context["probe"], context["lm"]
        b, length = seq.valid.shape
        keys = probe["keys"]
        if self.rope:  # positions counted from each sample's first token, as when it runs alone
            positions = seq.positions
            if positions.dim() == 2:
                first = positions.masked_fill(~seq.valid, torch.iinfo(positions.dtype).max).min(1, keepdim=True)
                positions = positions - first.values
            keys = rotated_keys(keys, lm, seq.hidden, positions)
        norms = key_l1_norm(keys)  # (B, L)
        normed = lm.norm(seq.hidden).reshape(b * length, -1)  # the model's final norm, as the official code
        rows, samples = context["rows"], context["sample"]  # (I, n) flat rows, (I,) batch row of each image
        is_text = (seq.vis_index < 0) & seq.valid
        position = torch.arange(length, device=device)

        first_valid = seq.valid.float().argmax(dim=1)  # (B,) physical index of each sample's first token
        out = {}
        text_rows = []
        for i in range(visual.num_images):
            after = is_text[samples[i]] & (position > int((rows[i] % length).max()))
            text_rows.append(after.nonzero().squeeze(1) + int(samples[i]) * length)
        n_pivots = [pivot_counts(k, len(t), self.pivot_image, self.pivot_text) for t in text_rows]
        for counts in sorted(set(n_pivots)):
            members = [i for i, c in enumerate(n_pivots) if c == counts]
            n_img, n_txt = counts
            image_rows = rows[members]  # (M, n)
            img_norm = norms.view(-1)[image_rows]
            img_pivots = torch.sort(img_norm, dim=1, descending=True, stable=True).indices[:, :n_img]
            x = normed[image_rows]  # (M, n, D)
            pivots = img_pivots
            valid = None
            if n_txt:
                txt = []
                for i in members:
                    order = torch.sort(norms.view(-1)[text_rows[i]], descending=True, stable=True).indices
                    txt.append(text_rows[i][order[:n_txt]])
                txt = torch.stack(txt)  # (M, n_txt) flat rows
                x = torch.cat([x, normed[txt]], dim=1)
                pivots = torch.cat([img_pivots, n + torch.arange(n_txt, device=device).expand(len(members), -1)], 1)
                valid = torch.arange(n + n_txt, device=device).expand(len(members), -1) < n
            if self.pivot_order == "official":
                pivots = self.official_order(pivots, image_rows, txt if n_txt else None, samples[members], length,
                                             first_valid)
            kept = ops.duplication_select(x, pivots, self.kept_count(k, n, n_img, n_txt), valid=valid)
            out.update(zip(members, kept))
        if len({len(v) for v in out.values()}) == 1:
            return torch.stack([out[i] for i in range(visual.num_images)])
        mask = torch.zeros(visual.num_images, n, dtype=torch.bool, device=device)  # official budgets differ
        for i, kept in out.items():
            mask[i, kept] = True
        return mask

    @staticmethod
    def official_order(pivots, image_rows, text_rows, samples, length, first_valid):
        """Pivot columns reordered as CPython iterates `set(image_indices + query_indices)` in the official code,
        the indices being positions in the sample's own (unpadded) sequence; image pivots come first in
        decreasing key norm, then text pivots, as the official `topk` lists them."""
        n_img = pivots.shape[1] - (0 if text_rows is None else text_rows.shape[1])
        flat = image_rows.gather(1, pivots[:, :n_img])
        if text_rows is not None:
            flat = torch.cat([flat, text_rows], dim=1)
        index = (flat % length - first_valid[samples][:, None]).tolist()
        order = [[row.index(i) for i in set(row)] for row in index]
        return pivots.gather(1, torch.tensor(order, device=pivots.device))
