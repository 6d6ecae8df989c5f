"""DyVTE: dynamic visual-token exit, learned per sample by a small router at every decoder layer.

Wu, Lin, Ye, Zhou, Sun, Ji, "Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit
and the Empirical Findings" (github.com/DoubtedSteam/DyVTE). Claim: after some layer, the visual tokens of
a sample have handed their information to the text tokens, and all of them can leave the sequence at once.

As in the official code (llava/model/language_model/modeling_llama.py, `Router` and `LlamaModel.forward`):
- one router per decoder layer: Linear(2d -> 2048, no bias), GELU, Linear(2048 -> 2, no bias);
- its input at layer l is concat(mean of the text hidden states after the image except the last token, the
  last token's hidden state), both taken from the output of layer l (the input of layer l + 1);
- at the first layer where logit[1] > logit[0], ALL visual tokens of that sample leave the sequence: hidden
  states, mask, positions and the KV cache of every deeper layer.
Here router l decides before decoder layer l + 1 (the loop drops tokens before a layer), so decisions are
taken at layers 1 .. L-1; the last router is kept only so that the weight files have the paper's layout.

Our choices (the official code handles batch size 1 and one image at fixed offsets):
- per sample of a batch: the text after the sample's LAST visual token, valid (non-padding) tokens only;
  every image of the sample leaves together; samples of one batch exit at different layers (the selection
  is a keep-mask, see `vtc/adapters/decoder.py`);
- the feature is computed in float32 from the hidden states as they are (detached, as in the paper).

Without trained weights it does not pretend to be DyVTE: it warns at `patch()` and the report says which
fallback ran: a fixed exit layer (`exit_layer`, default round(L / 2)), or, with `attention_threshold`,
exit at the first layer where the last prompt token's attention to the sample's visual tokens (mean over
heads, summed over the tokens, at the layer before) drops below the threshold.

Weights: `vtc.train(model, "dyvte", data=..., save="dyvte.safetensors")` trains the routers (see
`vtc/train.py`); `vtc.patch(model, "dyvte", weights="dyvte.safetensors")` loads them. The safetensors keys
are `routers.{l}.w1.weight` / `routers.{l}.w2.weight`; keys named `...visual_gates_router.{l}.w1.weight`
(the official checkpoint's names) load too.
"""

from __future__ import annotations

import re
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from ..local import PerThread
from .base import (
    Strategy,
    VisualTokens,
    check_weights_width,
    last_valid_index,
    read_safetensors,
    register_strategy,
)

ROUTER_HIDDEN = 2048


class Router(nn.Module):
    """Linear(2d -> 2048, no bias), GELU, Linear(2048 -> 2, no bias): logits (stay, exit)."""

    def __init__(self, dim: int, hidden: int = ROUTER_HIDDEN):
        super().__init__()
        self.w1 = nn.Linear(2 * dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, 2, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


def make_routers(hidden_size: int, num_layers: int, seed: int = 0) -> nn.ModuleList:
    """One router per decoder layer, Xavier-uniform initialised as the official init_weight.py does (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    routers = nn.ModuleList(Router(hidden_size) for _ in range(num_layers))
    for router in routers:
        for linear in (router.w1, router.w2):
            bound = (6.0 / sum(linear.weight.shape)) ** 0.5
            with torch.no_grad():
                linear.weight.copy_(torch.rand(linear.weight.shape, generator=generator) * 2 * bound - bound)
    return routers


def load_routers(path: str | Path) -> nn.ModuleList:
    """Routers from a safetensors file written by `vtc.train` (or with the official checkpoint's key names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"dyvte weights not found: {str(path)!r} is not a file; train them with "
            f"vtc.train(model, strategy='dyvte', data=..., save={str(path)!r}), or pass weights=None for the "
            f"announced training-free fallback (exit_layer=... or attention_threshold=...)"
        )
    state, pattern = {}, re.compile(r"(?:^|\.)(?:routers|visual_gates_router)\.(\d+)\.(w1|w2)\.weight$")
    for key, value in read_safetensors(path, "dyvte")[0].items():
        match = pattern.search(key)
        if match:
            state[(int(match.group(1)), match.group(2))] = value
    layers = sorted({layer for layer, _ in state})
    complete = all((i, w) in state for i in layers for w in ("w1", "w2"))
    if not layers or layers != list(range(len(layers))) or not complete:
        raise ValueError(f"{path} holds no complete set of DyVTE routers (keys routers.<layer>.w1/w2.weight)")
    hidden, two_d = state[(0, "w1")].shape
    routers = nn.ModuleList(Router(two_d // 2, hidden) for _ in layers)
    for i, router in enumerate(routers):
        router.w1.weight.data.copy_(state[(i, "w1")].float())
        router.w2.weight.data.copy_(state[(i, "w2")].float())
    return routers.eval()


def save_routers(routers: nn.ModuleList, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {
        f"routers.{i}.{w}.weight": getattr(router, w).weight.detach().cpu().contiguous()
        for i, router in enumerate(routers)
        for w in ("w1", "w2")
    }
    save_file(state, str(path), metadata={"format": "pt", "strategy": "dyvte"})


def router_features(seq, tail: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2D) float32: concat(mean of the valid text hidden states after the sample's last visual token and
    before its last token, the last token's hidden state), per row of the (left-padded) sequence.

    `tail` (B,): tokens at the end of each row to ignore (training: the answer), so that the last token is
    the last prompt token."""
    hidden, valid, vis = seq.hidden.float(), seq.valid, seq.vis_index
    b, length, _ = hidden.shape
    pos = torch.arange(length, device=hidden.device).expand(b, -1)
    last = last_valid_index(valid)  # the last prompt token, also under right padding
    if tail is not None:
        last = last - tail.to(hidden.device)
    is_vis = (vis >= 0) & valid
    after = torch.where(is_vis, pos, torch.full_like(pos, -1)).max(dim=1).values  # last visual token (-1: none)
    text = valid & ~is_vis & (pos > after[:, None]) & (pos < last[:, None])
    mean = (hidden * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
    final = hidden[torch.arange(b, device=hidden.device), last]
    return torch.cat([mean, final], dim=-1)


@register_strategy
class DyVTE(Strategy):
    name = "dyvte"
    aliases = ("dy_vte",)
    stage = "llm"
    paper = "Wu et al., Dynamic Visual-Token Exit (DoubtedSteam/DyVTE)"
    default_keep = 1.0
    text_queries = "last"
    _stage_exits = PerThread(None)  # this thread's exits of the current prefill

    def __init__(
        self,
        keep: float | int = 1.0,
        weights: str | Path | None = None,
        exit_layer: int | None = None,
        attention_threshold: float | None = None,
    ):
        super().__init__(keep)
        if exit_layer is not None and attention_threshold is not None:
            raise ValueError("dyvte: pass exit_layer OR attention_threshold (the fallback without weights), not both")
        if weights is not None and (exit_layer is not None or attention_threshold is not None):
            raise ValueError("dyvte: exit_layer / attention_threshold are the fallback without weights; drop them")
        if attention_threshold is not None and not 0.0 < float(attention_threshold) < 1.0:
            raise ValueError(f"attention_threshold={attention_threshold}: pass an attention mass in (0, 1)")
        self.weights = weights
        self.exit_layer = exit_layer
        self.attention_threshold = None if attention_threshold is None else float(attention_threshold)
        self.routers: nn.ModuleList | None = load_routers(weights) if weights is not None else None
        self.num_layers: int | None = None
        self.notes: list[str] = []
        if keep != 1.0:
            self.notes.append(f"keep={keep} does not apply to dyvte: all visual tokens of a sample exit at once")
        # training hooks (vtc.train): force every sample to exit at one layer, record router inputs, answer tails
        self._force: int | None = None
        self._record: dict[int, torch.Tensor] | None = None
        self._tail: torch.Tensor | None = None
        self._stage_exits = None
        if self.routers is None:
            self._announce()

    @classmethod
    def with_routers(cls, routers: nn.ModuleList) -> DyVTE:
        """A DyVTE using these (e.g. freshly made, being trained) routers; no fallback, no warning."""
        self = cls.__new__(cls)
        Strategy.__init__(self, 1.0)
        self.weights, self.exit_layer, self.attention_threshold = None, None, None
        self.routers, self.num_layers, self.notes = routers, None, []
        self._force, self._record, self._tail, self._stage_exits = None, None, None, None
        return self

    # --- fallback ----------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        if self.routers is not None:
            return "router"
        return "attention" if self.attention_threshold is not None else "fixed"

    def _fixed_layer(self, num_layers: int) -> int:
        return self.exit_layer if self.exit_layer is not None else max(1, round(num_layers / 2))

    def _announce(self) -> None:
        if self.mode == "attention":
            what = (
                f"exit at the first layer where the last prompt token's attention to the sample's visual tokens "
                f"drops below {self.attention_threshold}"
            )
        else:
            layer = self.exit_layer if self.exit_layer is not None else "round(L/2)"
            what = f"every sample's visual tokens exit before decoder layer {layer}"
        message = (
            f"dyvte without trained router weights: NOT the paper's learned exit, a training-free fallback: {what}. "
            f"Train routers with vtc.train(model, strategy='dyvte', data=..., save=path) and pass weights=path"
        )
        warnings.warn(message, UserWarning, stacklevel=5)  # the caller of vtc.patch
        self.notes.append(message)

    def check_adapter(self, adapter) -> None:
        if self.routers is not None:
            width = self.routers[0].w1.in_features // 2
            check_weights_width("dyvte", self.weights, width, adapter.language_model.config.hidden_size)

    # --- layers ------------------------------------------------------------------------------------
    def prune_layers(self, num_layers: int) -> list[int]:
        if self.routers is not None and len(self.routers) != num_layers:
            raise ValueError(
                f"dyvte weights have {len(self.routers)} routers but the language model has {num_layers} layers: "
                f"train weights for this model with vtc.train"
            )
        self.num_layers = num_layers
        if self._force is not None:
            return [self._force]
        if self.mode == "fixed":
            layer = self._fixed_layer(num_layers)
            if not 1 <= layer < num_layers:
                raise ValueError(f"dyvte exit_layer={layer}: pass a layer in [1, {num_layers - 1}]")
            return [layer]
        return list(range(1, num_layers))

    def describe(self) -> str:
        if self.mode == "router":
            return f"dyvte(routers{'=' + str(self.weights) if self.weights else ''})"
        if self.mode == "attention":
            return f"dyvte(FALLBACK: attention_threshold={self.attention_threshold}, no weights)"
        return f"dyvte(FALLBACK: exit_layer={self.exit_layer or 'L/2'}, no weights)"

    # --- selection ---------------------------------------------------------------------------------
    def sample_exits(self, visual: VisualTokens) -> torch.Tensor:
        """(B,) bool: which samples of the batch let their visual tokens exit before this layer."""
        context, stage = visual.context, visual.stage
        seq = context["sequence"]
        b = seq.valid.shape[0]
        device = seq.hidden.device
        if self._force is not None or self.mode == "fixed":
            return torch.ones(b, dtype=torch.bool, device=device)
        if self.mode == "attention":
            probe = context["probe"]
            is_vis = (probe["vis_index"] >= 0) & probe["valid"]
            mass = (probe["per_key"].float() * is_vis).sum(dim=1)  # (B,) last token's attention to visual tokens
            return mass < self.attention_threshold
        cached = self._stage_exits  # the image groups of one stage share the per-sample decision
        if cached is not None and cached[0]() is seq and cached[1] == stage:
            return cached[2]
        features = router_features(seq, self._tail)
        if self._record is not None:  # training: record the router input, keep every token
            self._record[stage] = features
            is_vis = (seq.vis_index >= 0) & seq.valid
            self._record["visual_tail"] = (is_vis.flip(1).cumsum(1) == 0).sum(1)  # tokens after the last visual
            exits = torch.zeros(b, dtype=torch.bool, device=device)
        else:
            router = self.routers[stage - 1]
            if router.w1.weight.device != device:
                self.routers.to(device)
            with torch.no_grad():
                logits = router(features.to(router.w1.weight.dtype))
            exits = logits[:, 1] > logits[:, 0]
        self._stage_exits = (weakref.ref(seq), stage, exits)
        return exits

    def select(self, visual: VisualTokens) -> torch.Tensor:
        """A keep-mask (I, n): a row is all True (the image's sample stays) or all False (it exits)."""
        n, device = visual.num_tokens, visual.features.device
        if n == 0:
            return torch.zeros(visual.num_images, 0, dtype=torch.bool, device=device)
        exits = self.sample_exits(visual)[visual.context["sample"]]
        return (~exits)[:, None].expand(-1, n).clone()
