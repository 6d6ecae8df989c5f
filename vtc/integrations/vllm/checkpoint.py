"""Save a transformers VLM in the checkpoint layout vLLM's loader reads (no vLLM import).

transformers 5.x saves LLaVA's CLIP tower as `vision_tower.embeddings...`; the hub checkpoints that vLLM's
`LlavaForConditionalGeneration` maps (e.g. llava-hf/llava-1.5-7b-hf) name it `vision_tower.vision_model...`.
`save_for_vllm` writes the hub layout, which transformers loads back unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_for_vllm(model: torch.nn.Module, processor, path: str | Path) -> Path:
    """`save_pretrained` of the model (fp32 weights) and processor into `path`, weight names in the hub layout."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if type(model).__name__ == "LlavaForConditionalGeneration":
        file = path / "model.safetensors"
        weights = load_file(file)
        renamed = {}
        for name, tensor in weights.items():
            if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
                name = "vision_tower.vision_model." + name[len("vision_tower.") :]
            renamed[name] = tensor
        save_file(renamed, file, metadata={"format": "pt"})
    return path


def save_qwen_vl_processor(path: str | Path, family: str, tokenizer, min_pixels: int, max_pixels: int) -> Path:
    """A real `Qwen2_5_VLProcessor` / `Qwen2VLProcessor` (14 px patches, 2x2 merge, 2 frames per temporal patch,
    Qwen's chat format) saved into `path`, video processor included: vLLM's Qwen-VL processing loads the whole
    processor (its video processor needs torchvision, so call this in the vLLM venv)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from ...testing.qwen2_vl import MERGE, PATCH, QWEN_CHAT_TEMPLATE, TEMPORAL

    common = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor_cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        video_processor=Qwen2VLVideoProcessor(size=size, **common),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return Path(path)
