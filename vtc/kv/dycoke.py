"""DyCoke's dynamic KV-cache pruning at decode: deep layers attend to the visual entries the new token needs.

Tao et al., *DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models*, CVPR 2025,
arXiv:2411.15024; reference code: KD-TAO/DyCoke, llava/model/language_model/modeling_qwen2.py
(`PrunableDynamicCache.dycoke_pruning` / `update_cache`, called in `Qwen2Model.forward`). At every decode step
(one new token), at decoder layer L (dycoke_l = 3): the new token's attention at layer L - 1 (softmax over its
whole row, mean over heads) to the visual entries is compared with the previous step's by cosine similarity;
below 0.9 (and at the first step), layers L.. attend only to the top int(n (1 - p)) of the n visual entries
(p = dycoke_p: 0.7 in the README's command, 0.8 the lmms-eval default) plus every text and generated entry.
Nothing is evicted: the full cache stays and the next step chooses again. As in the official code (the pruned
index list is reset before layer L at every step), a step whose attention is similar (>= 0.9) to the previous
one attends to the FULL cache in every layer.

Use with the `dycoke` strategy (TTM before the LLM): `vtc.patch(model, "dycoke", kv="dycoke")`; no kv_budget
(`kv_options={"ratio": p, "layer": L, "threshold": 0.9}`). Ours: attention from q and k of layer L - 1 (never
output_attentions), decisions per sample of a batch (the official code runs one sample), steps with several new
tokens (assisted decoding) attend to the full cache, ties to the lower index. Layers L.. must cache the same
entries as layer L - 1 (a pre-LLM strategy, or none); the report's `budget` column is 0 (a ratio, no budget).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..local import PerThread
from .base import KVPolicy, decode_scores, register_policy


@register_policy
class DyCokeKV(KVPolicy):
    name = "dycoke"
    aliases = ("dycoke_kv",)
    paper = "Tao et al., DyCoke, CVPR 2025 (arXiv:2411.15024)"
    needs_budget = False
    evict_at_decode = False
    _previous = PerThread(None)  # (B, K) the last step's attention to the visual entries
    _saved = PerThread(None)  # the validity of layers L.. before this step's pruning
    attended = PerThread([])  # per step, (B,) visual entries layers L.. attended to (tests, inspection)

    def __init__(self, budget: int | None = None, ratio: float = 0.7, layer: int = 3, threshold: float = 0.9):
        if budget is not None:
            raise ValueError("KV policy 'dycoke' takes no kv_budget: it keeps int(n (1 - ratio)) visual entries")
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"dycoke: ratio (dycoke_p) must be in [0, 1), got {ratio!r}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"dycoke: layer (dycoke_l) must be an int >= 1, got {layer!r}")
        self.budget = 0
        self.ratio, self.layer, self.threshold = float(ratio), layer, float(threshold)
        self.config = None
        self._reset()

    def bind(self, lm: torch.nn.Module) -> None:
        super().bind(lm)
        if self.layer >= lm.config.num_hidden_layers:
            raise ValueError(
                f"dycoke: layer={self.layer}, but the language model has {lm.config.num_hidden_layers} layers: "
                f"pass kv_options={{'layer': L}} with 1 <= L < {lm.config.num_hidden_layers}"
            )

    def describe(self) -> str:
        return f"dycoke(ratio={self.ratio}, layer={self.layer}, threshold={self.threshold}; attends, evicts nothing)"

    def _reset(self) -> None:
        super()._reset()
        self._previous, self._saved, self.attended = None, None, []

    def keep_mask(self, layer, state, prefill):
        return self.valid(layer, state)

    def observe_decode(self, i, layer, hidden, position_embeddings, state) -> None:
        if i != self.layer - 1 or hidden.shape[1] != 1:
            return
        deep = state.layer_valid[self.layer :]
        valid = state.layer_valid[i]
        if valid.dim() != 2 or any(v.shape != valid.shape or not torch.equal(v, valid) for v in deep):
            raise NotImplementedError(
                "KV policy 'dycoke' needs layers >= its layer to cache the same entries as the layer before (a "
                "pre-LLM strategy such as 'dycoke', or none); this strategy prunes inside the LLM"
            )
        k_old = valid.shape[-1]
        scores = decode_scores(layer, hidden, position_embeddings, state, i).mean(dim=1)[:, :k_old]  # (B, K)
        visual = self.meta[i]["visual"] & valid
        attention = scores.masked_fill(~visual, 0.0)
        previous = self._previous
        if previous is None or previous.shape[0] != attention.shape[0] or previous.shape[1] > k_old:
            prune = torch.ones(attention.shape[0], dtype=torch.bool, device=attention.device)
        else:  # entries appended since are text: zero on both sides
            previous = F.pad(previous, (0, k_old - previous.shape[1]))
            prune = F.cosine_similarity(attention, previous, dim=-1) < self.threshold
        self._previous = attention
        count = (visual.sum(dim=1).double() * (1 - self.ratio) + 1e-9).floor().long()  # int(n (1 - p))
        order = torch.sort(attention.masked_fill(~visual, float("-inf")), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order.indices).scatter_(
            1, order.indices, torch.arange(k_old, device=valid.device).expand_as(order.indices)
        )
        dropped = visual & (rank >= count[:, None]) & prune[:, None]
        self._saved = list(deep)
        masked = valid & ~dropped
        for j in range(self.layer, len(state.layer_valid)):
            state.layer_valid[j] = masked
        self.attended.append((masked & visual).sum(dim=1))

    def after_decode(self, state) -> None:
        if self._saved is not None:  # back to the full cache (the new entries appended): the next step chooses again
            restored: dict[int, torch.Tensor] = {}  # layers that shared one validity tensor share it again
            for j, before in enumerate(self._saved, start=self.layer):
                new = state.layer_valid[j][..., before.shape[-1] :]
                state.layer_valid[j] = restored.setdefault(id(before), torch.cat([before, new], dim=-1))
            self._saved = None
        super().after_decode(state)
