"""Tiny Qwen3-VL models (dense and MoE) and an offline processor, for tests and demos.

Everything is built offline: real transformers classes (`Qwen3VLForConditionalGeneration`,
`Qwen3VLMoeForConditionalGeneration`) with random weights, the BPE tokenizer of `vtc.testing.qwen2_vl` (same
special tokens as Qwen2-VL / Qwen3-VL), and the Qwen2-VL image processor (PIL backend) with Qwen3-VL's 16 px
patches, as `AutoImageProcessor` picks for Qwen3-VL. Videos are generated frame stacks patchified here the way
Qwen3-VL's video processor does (pairs of frames form one temporal patch; its own processor needs torchvision,
which must not be installed beside the CPU torch, DESIGN.md section 7). As Qwen3-VL's processor does, each
temporal patch of a video is its own `<t seconds><|vision_start|><|video_pad|>...<|vision_end|>` block: frames
are separated by timestamp text.

The tiny models have DeepStack: vision layers `deepstack_visual_indexes` (default 0, 1, 2) each feed their
own merger, whose output is added to the visual tokens' hidden states after decoder layers 0, 1, 2.
"""

from __future__ import annotations

import torch

from .qwen2_vl import (
    IMAGE_PAD,
    MERGE,
    TEMPORAL,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    TinyQwenVLProcessor,
    qwen_inputs,
    special_token_ids,
    tiny_qwen_tokenizer,
)

PATCH = 16  # Qwen3-VL's patch size: one visual token = a 2x2 block of 16 px patches = 32 x 32 px
QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")


def tiny_qwen3_vl_config(
    family: str = "qwen3_vl",
    *,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    text_layers: int = 4,
    text_hidden: int = 64,
    deepstack_visual_indexes: tuple[int, ...] = (0, 1, 2),
    initializer_range: float = 0.1,
):
    """Config of a tiny Qwen3-VL (`family="qwen3_vl"`) or Qwen3-VL-MoE (`"qwen3_vl_moe"`, 4 experts, top-2).

    Interleaved M-RoPE over head_dim 16 (mrope_section [4, 2, 2]); DeepStack from the vision layers
    `deepstack_visual_indexes` into decoder layers 0 .. len - 1."""
    tok = tiny_qwen_tokenizer()
    text = dict(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=text_hidden // 4,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    vision = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_heads=4,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        out_hidden_size=text_hidden,
        num_position_embeddings=64,  # an 8 x 8 learned grid, interpolated to each image's patch grid
        deepstack_visual_indexes=list(deepstack_visual_indexes),
        initializer_range=initializer_range,
    )
    common = special_token_ids(tok)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeConfig

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_hidden, decoder_sparse_step=1)
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(QWEN3_FAMILIES)}")


def tiny_qwen3_vl(family: str = "qwen3_vl", *, seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs):
    """A tiny random-weight `Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration` (fp32, eval)."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_qwen3_vl_config(family, **config_kwargs)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen3VLMoeForConditionalGeneration
    model = cls._from_config(config, attn_implementation=attn_implementation).eval()
    if family == "qwen3_vl_moe":  # the experts are created empty (torch.empty): give them random weights
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".experts." in name:
                    param.normal_(0.0, config.text_config.initializer_range)
    return model


class TinyQwen3VLProcessor(TinyQwenVLProcessor):
    """Offline stand-in for `Qwen3VLProcessor`: tokenizer + Qwen2-VL image processor (PIL backend, 16 px patches)
    + a frame-stack video path. `__call__(text=[...], images=[...], videos=[...])` expands each <|image_pad|>
    into grid_h * grid_w / 4 tokens and each <|video_pad|> into one timestamped block per temporal patch,
    `<t seconds><|vision_start|>` + grid_h * grid_w / 4 <|video_pad|> + `<|vision_end|>`; returns input_ids,
    attention_mask, mm_token_type_ids, pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw.
    Everything but the patch size, the normalisation, the prompt and the video text is `TinyQwenVLProcessor`'s."""

    patch = PATCH

    def __init__(self, min_pixels: int = 32 * 32, max_pixels: int = 32 * 32 * 16, fps: float = 2.0, tokenizer=None):
        super().__init__(min_pixels, max_pixels, tokenizer, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        self.fps = fps

    def prompt(self, question: str, n_images: int = 0, n_videos: int = 0) -> str:
        """A chat prompt: the images (each wrapped in vision start/end), the videos (one <|video_pad|> each,
        expanded by `__call__` into timestamped frames), then the question."""
        vision = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * n_images + VIDEO_PAD * n_videos
        return f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"

    def _video_text(self, grid: list[int]) -> str:
        """One timestamped block per temporal patch; the time is the mean of its two frames' times."""
        t, h, w = grid
        frame = VIDEO_PAD * (h * w // MERGE**2)
        times = [(TEMPORAL * i + (TEMPORAL - 1) / 2) / self.fps for i in range(t)]
        return "".join(f"<{time:.1f} seconds>{VISION_START}{frame}{VISION_END}" for time in times)


def tiny_qwen3_processor(**kwargs) -> TinyQwen3VLProcessor:
    """The offline Qwen3-VL processor (see `TinyQwen3VLProcessor`)."""
    return TinyQwen3VLProcessor(**kwargs)


# batch of chat prompts (left padded): the same builder as Qwen2-VL's, the processor decides the rest
qwen3_inputs = qwen_inputs
