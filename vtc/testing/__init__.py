"""Tiny models and processors built fully offline, for tests, demos and notebooks: one module per family.

- `vtc.testing.llava` (re-exported here): tiny LLaVA-1.5, its processor, synthetic images, the trained tiny VLM
- `vtc.testing.llava_next`: LLaVA-NeXT and LLaVA-OneVision (images, videos)
- `vtc.testing.qwen2_vl`: Qwen2-VL and Qwen2.5-VL, the trained tiny video VLM (`load_tiny_video_vlm`, re-exported)
- `vtc.testing.qwen3_vl`: Qwen3-VL and Qwen3-VL-MoE
- `vtc.testing.internvl`: InternVL (-hf)
- `vtc.testing.clip`: a tiny open_clip CLIP for QuoTA's `scorer="clip"` (needs the `clip` extra; not re-exported)
- `vtc.testing.real` (re-exported here): real architectures (published configs, random weights, depth cut on
  request) and their offline processors: `real_config`, `real_model`, `real_processor`, `real_inputs`

Every builder makes a real transformers class with random weights; nothing is downloaded.
"""

from .llava import (
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TEXT_BACKBONES,
    llava_inputs,
    load_tiny_vlm,
    make_image,
    tiny_llava,
    tiny_llava_config,
    tiny_llava_processor,
    tiny_tokenizer,
    tiny_vlm_dir,
)
from .qwen2_vl import load_tiny_video_vlm, tiny_video_vlm_dir
from .real import REAL_NAMES, real_config, real_inputs, real_model, real_processor

__all__ = [
    "REAL_NAMES",
    "real_config",
    "real_inputs",
    "real_model",
    "real_processor",
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TEXT_BACKBONES",
    "llava_inputs",
    "load_tiny_vlm",
    "load_tiny_video_vlm",
    "tiny_video_vlm_dir",
    "make_image",
    "tiny_llava",
    "tiny_llava_config",
    "tiny_llava_processor",
    "tiny_tokenizer",
    "tiny_vlm_dir",
    "TINY_MODEL_IDS",
    "load_tiny_model",
]

TINY_MODEL_IDS = (
    "vtc-tiny",
    "vtc-tiny-vlm",
    "vtc-tiny-video-vlm",
    "vtc-tiny-qwen2-vl",
    "vtc-tiny-onevision",
    "vtc-tiny-internvl",
)


def load_tiny_model(name: str, attn_implementation: str = "sdpa") -> tuple:
    """(model, processor) for a local tiny model id, built offline (fp32, eval mode):

    - `vtc-tiny`: random-weight LLaVA-1.5 (`tiny_llava`) and its `LlavaProcessor`
    - `vtc-tiny-vlm`: the tiny LLaVA trained on `vtc.data` (`load_tiny_vlm`)
    - `vtc-tiny-video-vlm`: the tiny Qwen2-VL trained on `vtc.data`'s moving-shapes clips (`load_tiny_video_vlm`)
    - `vtc-tiny-qwen2-vl`: random-weight Qwen2-VL (`qwen2_vl.tiny_qwen_vl`) and a `Qwen2VLProcessor`
    - `vtc-tiny-onevision`: random-weight LLaVA-OneVision (`llava_next.tiny_llava_onevision`) and a
      `LlavaOnevisionProcessor`
    - `vtc-tiny-internvl`: random-weight InternVL (`internvl.tiny_internvl`) and an `InternVLProcessor`

    The processors are the families' real classes for images (without their video processors, which need
    torchvision)."""
    if name == "vtc-tiny":
        return tiny_llava(attn_implementation=attn_implementation), tiny_llava_processor()
    if name == "vtc-tiny-vlm":
        model, processor = load_tiny_vlm()
        model.set_attn_implementation(attn_implementation)
        return model, processor
    if name == "vtc-tiny-video-vlm":
        from .qwen2_vl import load_tiny_video_vlm

        model, processor = load_tiny_video_vlm()
        model.set_attn_implementation(attn_implementation)
        return model, processor
    if name == "vtc-tiny-qwen2-vl":
        from .qwen2_vl import tiny_qwen2_vl_processor, tiny_qwen_vl

        return tiny_qwen_vl("qwen2_vl", attn_implementation=attn_implementation), tiny_qwen2_vl_processor()
    if name == "vtc-tiny-onevision":
        from .llava_next import tiny_llava_onevision, tiny_llava_onevision_processor

        return tiny_llava_onevision(attn_implementation=attn_implementation), tiny_llava_onevision_processor()
    if name == "vtc-tiny-internvl":
        from .internvl import tiny_internvl, tiny_internvl_processor

        return tiny_internvl(attn_implementation=attn_implementation), tiny_internvl_processor()
    raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODEL_IDS)}")
