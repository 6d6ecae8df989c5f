"""Tiny models and processors built fully offline, for tests, demos and notebooks: one module per family.

- `vtc.testing.llava` (re-exported here): tiny LLaVA-1.5, its processor, synthetic images, the trained tiny VLM
- `vtc.testing.llava_next`: LLaVA-NeXT and LLaVA-OneVision (images, videos)
- `vtc.testing.qwen2_vl`: Qwen2-VL and Qwen2.5-VL
- `vtc.testing.qwen3_vl`: Qwen3-VL and Qwen3-VL-MoE
- `vtc.testing.internvl`: InternVL (-hf)
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
    "make_image",
    "tiny_llava",
    "tiny_llava_config",
    "tiny_llava_processor",
    "tiny_tokenizer",
    "tiny_vlm_dir",
]
