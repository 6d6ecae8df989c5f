"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`): the Qwen2-VL adapter plus
DeepStack.

What is shared with Qwen2-VL (see `qwen2_vl.py`): dynamic resolution (one token = a 2x2 block of patches, 16 px
in Qwen3-VL), images and video frames as units with their own budget, 3-D M-RoPE position ids computed by the
outer model (Qwen3-VL interleaves t/h/w over the frequencies inside its rotary embedding, which the decoder loop
calls as it is), logical decode positions with the rope deltas, and the [CLS] surrogate (the attention each
merged token receives in a vision layer). The text decoder layers (q/k RMS norms, MoE MLPs in the MoE variant)
have the Llama-style signature the shared decoder loop runs; the probes apply the q/k norms.

Videos: Qwen3-VL's processor writes every temporal patch of a video as its own block, `<t seconds>
<|vision_start|> tokens <|vision_end|>`, so a video's frames are separate runs of the prompt with timestamp text
between them. Each frame is a unit (as in Qwen2-VL); its tokens keep their (t, h, w) positions, and the
timestamps are text, never pruned.

DeepStack: the vision tower also returns features from some of its layers (`deepstack_visual_indexes`), and HF's
text model adds the j-th of them to the visual tokens' hidden states after decoder layer j
(`visual_pos_masks`, `deepstack_visual_embeds`). A pre-hook on the language model takes them, in the order of the
flat visual tokens (the order vtc numbers them in); the decoder loop's `after_decoder_layer` hook adds, to each
visual token still in the sequence, the features of that token: after a pre-LLM selection only the kept tokens
get theirs, and after an in-LLM drop at layer K the injections after layers >= K go to the survivors only. A
merged token (e.g. `downsample`) sits at a kept token's place and gets that token's DeepStack features.
"""

from __future__ import annotations

import torch

from ..local import PerThread
from .base import register_adapter
from .qwen2_vl import QwenVLAdapter


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    name = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")

    _deepstack = PerThread(None)  # per injected layer, (n_visual, D) of this thread's prefill

    def collapse_rows(self, k: int) -> None:
        if self._deepstack is not None and self._pending_visual is not None:  # the features of one copy per sample
            first_copy = self._pending_visual.nonzero()[:, 0] % k == 0
            self._deepstack = [features[first_copy.to(features.device)] for features in self._deepstack]
        super().collapse_rows(k)

    def install_capture(self, handle) -> None:
        super().install_capture(handle)
        self._hooks.append(self.language_model.register_forward_pre_hook(self._capture_deepstack, with_kwargs=True))
        if "Moe" in type(self.model).__name__:
            self._hooks.append(self.language_model.register_forward_hook(_with_router_logits))

    def uninstall(self) -> None:
        super().uninstall()
        self._deepstack = None

    def _capture_deepstack(self, module, args, kwargs):
        """Language-model pre-hook: the DeepStack features of this forward (None at decode and for text)."""
        embeds, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        self._deepstack = None
        if embeds is None or mask is None:
            return args, kwargs
        visual = self._pending_visual
        if visual is not None and not torch.equal(mask.to(visual.device), visual):
            raise RuntimeError(
                "the DeepStack visual mask differs from the image/video tokens vtc found in input_ids: call the "
                "patched model with input_ids (not inputs_embeds) and the processor's image/video tokens"
            )
        self._deepstack = list(embeds)
        return args, kwargs

    def after_decoder_layer(self, layer: int, seq) -> torch.Tensor | None:
        """After decoder layer j < len(deepstack): add its DeepStack features to the visual tokens still present."""
        if self._deepstack is None or layer >= len(self._deepstack):
            return None
        present = seq.vis_index >= 0
        features = self._deepstack[layer].to(seq.hidden.device, seq.hidden.dtype)
        hidden = seq.hidden.clone()
        hidden[present] = hidden[present] + features[seq.vis_index[present]]
        if layer == len(self._deepstack) - 1:
            self._deepstack = None  # the last injection of this prefill: free the features
        return hidden


def _with_router_logits(module, args, output):
    """Language-model forward hook (MoE variant): the outer model reads `router_logits` from the language model's
    output, which vtc's decoder loop does not record (None: no auxiliary router loss on a patched model)."""
    if hasattr(output, "router_logits"):
        return output
    from transformers.modeling_outputs import MoeModelOutputWithPast

    return MoeModelOutputWithPast(**output, router_logits=None)
