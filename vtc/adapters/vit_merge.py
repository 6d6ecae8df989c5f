"""ToMe inside a CLIP vision tower: bipartite soft matching in every encoder layer, between attention and MLP.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (github.com/facebookresearch/ToMe,
tome/patch/timm.py `ToMeBlock` / `ToMeAttention`, tome/merge.py `bipartite_soft_matching`, `merge_wavg`).
Per layer l with r_l > 0, as the official block:

    x = x + attn(ln1(x))            # proportional attention: + log(size) on the keys' logits (optional)
    metric = keys of that attention, averaged over heads
    x, size = merge_wavg(bipartite_soft_matching(metric, r_l, class_token=True), x, size)
    x = x + mlp(ln2(x))

r_l is clamped to (tokens - 1) // 2 ([CLS] protected); sizes start at 1 and add up. After a merge the
sequence order is the official one, [CLS, unmerged A tokens, B tokens] (each in their previous order), so
that the next layer's A/B split (even/odd positions) is ToMe's.

How it sits in transformers (instance patches, restored by `remove()`): each encoder layer's `forward` is
replaced on the instance. Transformers records hidden states with hooks on the layer outputs and LLaVA
places one feature per image placeholder, so every layer *returns* its output expanded back to the
original token count (each original token carries the merged token it belongs to: ToMe's "unmerge") and
the next layer gathers the current tokens again. Attention and MLP run on the merged tokens only; the
expansion is a gather. With r = 0 everywhere the layers compute exactly what the unpatched ones do.

After the feature layer the merger stores, per image, the "merge" probe (I, 2, N) for the pre-LLM
stage: channel 0 is 1 at each merged token's representative (the surviving B token, recursively: its
original grid position, which is the position the token takes in the LLM), channel 1 its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..kernels.reference import merge_wavg
from ..local import PerThread


@dataclass
class MergeState:
    """The merged tokens of one tower call: rep (B, n) original index of each current token's representative,
    assign (B, N) current slot of every original token, size (B, n, 1) original tokens per current token."""

    rep: torch.Tensor
    assign: torch.Tensor
    size: torch.Tensor
    merged: bool = False


def merge_step(x: torch.Tensor, metric: torch.Tensor, r: int, state: MergeState) -> tuple[torch.Tensor, MergeState]:
    """One ToMe merge of (B, n, D) tokens matched on (B, n, C) metric ([CLS] = token 0 protected), returning
    the merged tokens in ToMe's order [CLS, unmerged A, B] and the updated state."""
    b, n, _ = x.shape
    r = min(r, (n - 1) // 2)  # ToMe: min(r, (t - protected) // 2)
    if r <= 0:
        return x, state
    match = ops.bipartite_match(metric, r, protect_first=True)
    merged, size = merge_wavg(x, match, state.size)  # survivors in their current order
    keep = match.keep_idx
    # slot of every current token in the merged (current-order) output
    kept = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    kept.scatter_(1, keep, True)
    slot = (kept.long().cumsum(1) - 1).scatter(1, match.src_idx, match.dst_pos)
    # ToMe's order: unmerged A tokens (even positions, [CLS] first), then the B tokens (odd positions)
    perm = torch.sort(keep % 2, dim=1, stable=True).indices
    inverse = torch.argsort(perm, dim=1)
    merged = merged.gather(1, perm[..., None].expand(-1, -1, merged.shape[-1]))
    size = size.gather(1, perm[..., None])
    new = MergeState(
        rep=state.rep.gather(1, keep.gather(1, perm)),
        assign=inverse.gather(1, slot).gather(1, state.assign),
        size=size,
        merged=True,
    )
    return merged, new


class TowerMerge:
    """Installs ToMe in the encoder layers of one CLIP-style vision tower (instance attributes and hooks
    only); `remove()` restores the layers exactly. plan: `vision_merge_plan`'s dict; `schedule[l]` tokens
    are merged in layer l; after layer `plan["layer"]`, `on_report(state)` is called."""

    state = PerThread(None)  # the merge state of this thread's tower call
    _keys = PerThread(None)

    def __init__(self, layers, plan: dict, on_report):
        self.layers = layers
        self.schedule = list(plan["schedule"]) + [0] * (len(layers) - len(plan["schedule"]))
        self.prop_attn = bool(plan["prop_attn"])
        self.report_layer = plan["layer"]
        self.on_report = on_report
        self._handles = []
        for index, layer in enumerate(layers):
            layer.forward = self._layer_forward(index, layer)
            if self.schedule[index] > 0:
                self._handles.append(layer.self_attn.k_proj.register_forward_hook(self._grab_keys))

    def _grab_keys(self, module, args, output):
        self._keys = output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers:
            if "forward" in vars(layer):
                del layer.forward
        self.state = None

    def _layer_forward(self, index: int, layer):
        merger = self

        def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
            b, n0, dim = hidden_states.shape
            state = merger.state
            if index == 0 or state is None or state.assign.shape != (b, n0):
                rep = torch.arange(n0, device=hidden_states.device).expand(b, -1)
                state = MergeState(rep, rep, torch.ones(b, n0, 1, device=hidden_states.device))
            x = hidden_states.gather(1, state.rep[..., None].expand(-1, -1, dim)) if state.merged else hidden_states
            residual = x
            h = layer.layer_norm1(x)
            mask = attention_mask
            if merger.prop_attn and state.merged:  # ToMe's proportional attention: + log(size) per key
                n = x.shape[1]
                bias = state.size[..., 0].log()[:, None, None, :].to(h.dtype).expand(b, 1, n, n)
                mask = bias if mask is None else mask + bias
            h, _ = layer.self_attn(hidden_states=h, attention_mask=mask, **kwargs)
            x = residual + h
            r = merger.schedule[index]
            if r > 0:
                keys = merger._keys
                heads = layer.self_attn.num_heads
                metric = keys.view(b, x.shape[1], heads, -1).mean(dim=2)  # keys averaged over heads
                x, state = merge_step(x, metric, r, state)
                merger._keys = None
            x = x + layer.mlp(layer.layer_norm2(x))
            merger.state = state
            if index == merger.report_layer:
                merger.on_report(state)
            if not state.merged:
                return x
            return x.gather(1, state.assign[..., None].expand(-1, -1, dim))

        return forward


def merge_probe(state: MergeState, drop_cls: bool) -> torch.Tensor:
    """(B, 2, N): 1 at each representative (channel 0) and its size (channel 1); [CLS] column dropped if asked."""
    b, n_tokens = state.assign.shape
    probe = torch.zeros(b, 2, n_tokens, device=state.rep.device)
    probe[:, 0].scatter_(1, state.rep, 1.0)
    probe[:, 1].scatter_(1, state.rep, state.size[..., 0].float())
    return probe[..., 1:] if drop_cls else probe


def vision_merge_plan(strategy, adapter) -> dict | None:
    """The in-tower merge plan of `strategy` (or of a member of a composition) for this adapter's tower, or
    None: {"schedule": r per layer, "prop_attn": bool, "layer": the layer whose output reaches the LLM}."""
    for member in getattr(strategy, "members", [strategy]):
        if getattr(member, "placement", None) != "vision":
            continue
        rows, cols = adapter.grid()  # patch tokens per image
        return member.vision_merge_plan(adapter.num_vision_layers(), adapter.feature_layer(), rows * cols)
    return None
