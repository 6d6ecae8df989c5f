"""MustDrop: multi-stage vision token dropping (spatial merging, key tokens, dual-attention filtering in the LLM).

Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model", arXiv:2411.10803
(github.com/liuting20/MustDrop: `llava/model/multimodal_encoder/clip_encoder.py` and `local_merge.py` for the vision
stage, `llava/model/language_model/modelling_sparse_llama.py` `dual_attention_filter` for the prefill stage; the
vision stage with a fixed budget in ModelTC/LightCompress `llmc/compression/token_reduction/mustdrop.py`).

What vtc does, per image:
1. Spatial merging (vision stage): the token grid is cut into non-overlapping 3 x 3 windows; a window's similarity
   is the mean pairwise cosine similarity of its 9 tokens (self-pairs excluded, `conditional_pooling`); the r most
   similar windows are merged into one token each, the mean of the 9 (`merge_wavg` with unit sizes), which takes
   the place of the window's last (bottom-right) token. r = (N - round(N * keep)) // 8 (LightCompress's
   `retained_tokens` rule: keep is the budget of this stage), or with `spatial_threshold=` the official adaptive
   r = number of windows whose similarity is >= the threshold (official 0.8; per image, where the official code
   takes the minimum over the batch to keep tensor shapes equal: a batch then gives what each sample gives alone).
   A window of 9 becomes 1, so this stage removes at most 8/9 of the tokens in whole windows (a 14 x 14 grid: 128 of
   196); a smaller keep is not reached here, and the report shows the realised counts.
2. Key tokens: the ceil(0.08 * n) tokens left after merging that the [CLS] token attends to most at the vision
   tower's last layer (mean over heads; official `keep_rate = 0.08` at layer 23 of 24) are never dropped later.
3. Prefill (dual-attention filtering): at decoder layers [2, 6, 10, 14] (of 32, scaled to the depth: round(l L / 32);
   vtc prunes the layer's output, i.e. before layer l + 1), with that layer's attention from the text tokens after
   the image to the visual tokens (mean over heads): a visual token is dropped when its attention summed over the
   text rows is below `global_thr` x the total AND its largest text-row attention is below `individual_thr`, unless
   it is a key token. Thresholds default to the official LLaVA-1.5 192-token scripts (0.001, 0.001); the scripts
   use (0.0012, 0.001) for 128 and (0.011, 0.01) for 64 tokens. Counts differ per image.
`layers=` takes the official `pruning_loc` indices: 0-based decoder layers whose OUTPUT is pruned (at most L - 2).

Where we differ from the official code, and why:
- Stage 1 runs on the visual tokens entering the LLM (similarity and mean of the projected features), not inside
  CLIP after its first layer (official) nor on the feature layer's hidden states (LightCompress): vtc has no
  in-tower window merge; every family gets the same stage this way. Merged tokens sit at the window's bottom-right
  position in raster order; the official code reorders the tower's tokens as [merged windows, the rest]. Only whole
  3 x 3 windows are considered (the official code asserts a grid divisible by 3).
- Key tokens are ranked by the [CLS] attention to the tokens of the original grid at the last layer (the official
  tower computes it after its own merging), among the tokens left after stage 1.
- The decode stage of the paper (an output-aware KV-cache policy) is NOT implemented: the official repository has
  no such policy either (its "sparse kv cache" step only re-indexes the cache to the pruned sequence, which vtc's
  decoder does by construction). A decode-time policy can be added with `kv=` (e.g. `kv="snapkv"`).
- Attention rows are computed in fp32 from q/k (SDPA stays on); the official code asks for output_attentions.
- Towers without [CLS]: Qwen uses vtc's [CLS] surrogate; SigLIP (OneVision) is refused.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..probes import decoder_attention_rows
from .base import Strategy, VisualTokens, register_strategy

OFFICIAL_LAYERS = (2, 6, 10, 14)  # self.pruning_layers of the 32-layer decoder


def window_similarity(features: torch.Tensor, grid: tuple[int, int], window: int = 3):
    """Whole non-overlapping window x window windows of a raster grid: (windows (W, window^2) token indices in
    raster order within the window, similarity (I, W): mean pairwise cosine excluding self-pairs)."""
    rows, cols = grid
    gh, gw = rows // window, cols // window
    r = torch.arange(gh * window, device=features.device).view(gh, window)
    c = torch.arange(gw * window, device=features.device).view(gw, window)
    windows = (r[:, None, :, None] * cols + c[None, :, None, :]).reshape(gh * gw, window * window)
    tokens = features[:, windows]  # (I, W, 9, D)
    images, count, size, dim = tokens.shape
    cosine = ops.pairwise_cosine(tokens.reshape(images * count, size, dim).float()).view(images, count, size, size)
    off_diagonal = 1 - torch.eye(size, device=features.device)
    return windows, (cosine * off_diagonal).sum(dim=(-1, -2)) / (size * (size - 1))


@register_strategy
class MustDrop(Strategy):
    name = "mustdrop"
    stage = "pre_llm"
    paper = "Liu et al., arXiv:2411.10803"
    default_keep = 192 / 576
    needs_keys = True  # the in-LLM probe carries each stage's layer input (the text rows are recomputed)

    def __init__(
        self,
        keep: float | int = 192 / 576,
        spatial_threshold: float | None = None,
        window: int = 3,
        key_rate: float = 0.08,
        layers: list[int] | tuple[int, ...] | None = None,
        global_thr: float = 0.001,
        individual_thr: float = 0.001,
        prefill: bool = True,
    ):
        super().__init__(keep)
        if int(window) < 2:
            raise ValueError(f"window={window}: pass the side of the merging windows, >= 2 (official 3)")
        self.spatial_threshold = spatial_threshold
        self.window, self.key_rate = int(window), float(key_rate)
        self.layers = None if layers is None else [int(x) for x in layers]
        self.global_thr, self.individual_thr = float(global_thr), float(individual_thr)
        self.prefill = bool(prefill)
        self._keys: dict[int, torch.Tensor] = {}  # image index -> key tokens (indices into its grid)

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"cls": [num_layers - 1]}

    def prune_layers(self, num_layers: int) -> list[int]:
        if not self.prefill:
            return []
        layers = self.layers or sorted({int(x * num_layers / 32 + 0.5) for x in OFFICIAL_LAYERS})
        return sorted({layer + 1 for layer in layers})  # the adapter refuses a layer the decoder does not have

    def describe(self) -> str:
        threshold = self.spatial_threshold
        spatial = f"threshold {threshold}" if threshold is not None else f"keep={self.keep:.3g}"
        prefill = f", filter {self.global_thr}/{self.individual_thr}" if self.prefill else ""
        return f"mustdrop(spatial {spatial}{prefill})"

    def stage_budget(self, n_original: int, n_alive: int, stage: str | int) -> int:
        return super().stage_budget(n_original, n_alive, stage) if stage == "pre_llm" else n_alive

    # --- stage 1 and 2: before the LLM ----------------------------------------------------------
    def select(self, visual: VisualTokens):
        if visual.stage != "pre_llm":
            return self._filter(visual)
        features, n = visual.features, visual.num_tokens
        images = visual.num_images
        windows, similarity = window_similarity(features, visual.grid, self.window)
        count, size = windows.shape
        if self.spatial_threshold is not None:  # per image: every window at or above the threshold
            chosen = similarity >= self.spatial_threshold
        else:
            r = max(0, min((n - visual.budget) // (size - 1), count))
            chosen = torch.zeros(images, count, dtype=torch.bool, device=features.device)
            chosen.scatter_(1, similarity.topk(r, dim=1).indices, True)
        member = torch.zeros(images, n, count, dtype=features.dtype, device=features.device)  # token -> its window
        member[:, windows, torch.arange(count, device=features.device)[:, None]] = 1.0
        member = member * chosen[:, None, :].to(features.dtype)
        means = (member.transpose(1, 2).float() @ features.float()) / size  # (I, W, D) window means
        last = windows[:, -1]  # each window's bottom-right token takes the merged one
        keep = member.sum(dim=2) == 0
        keep[:, last] |= chosen
        merged = features.clone()
        merged[:, last] = torch.where(chosen[..., None], means.to(features.dtype), features[:, last])
        self._choose_keys(visual, keep)
        return keep, merged

    def _choose_keys(self, visual: VisualTokens, keep: torch.Tensor) -> None:
        (cls,) = visual.cls_attention.values()
        score = cls.mean(dim=1).masked_fill(~keep, float("-inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        for row, image in enumerate(visual.image_index.tolist()):  # per image: its own count after merging
            count = math.ceil(self.key_rate * int(keep[row].sum()))
            self._keys[image] = visual.token_ids[row].gather(0, order[row, :count])

    # --- stage 3: dual-attention filtering inside the LLM ----------------------------------------
    def _filter(self, visual: VisualTokens) -> torch.Tensor:
        context = visual.context
        seq, lm, hidden = context["sequence"], context["lm"], context["probe"]["hidden_in"]
        b, length = seq.valid.shape
        is_visual = seq.vis_index >= 0
        index = torch.arange(length, device=is_visual.device)
        last_visual = torch.where(is_visual, index, -1).max(dim=1, keepdim=True).values
        text = ~is_visual & seq.valid & (index > last_visual)  # the text after the image(s)
        count = text.sum(dim=1)
        width = max(int(count.max()), 1)
        query = torch.argsort(text.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
        used = torch.arange(width, device=query.device)[None] < count[:, None]
        layer = lm.layers[visual.stage - 1]
        rows = decoder_attention_rows(layer, hidden, lm.rotary_emb(hidden, seq.positions), query, seq.valid)
        rows = rows * used[..., None]  # (B, Q, L)
        sample = context["rows"][:, 0] // length
        per_token = rows.transpose(1, 2).reshape(b * length, -1)[context["rows"]]  # (I, n, Q)
        total = per_token.sum(dim=-1)  # global attention of each visual token
        largest = per_token.amax(dim=-1)  # individual attention
        drop = (total < total.sum(dim=1, keepdim=True) * self.global_thr) & (largest < self.individual_thr)
        drop &= count[sample][:, None] > 0
        for row, image in enumerate(visual.image_index.tolist()):
            keys = self._keys.get(image)
            if keys is not None:
                drop[row] &= ~torch.isin(visual.token_ids[row], keys.to(drop.device))
        return ~drop
