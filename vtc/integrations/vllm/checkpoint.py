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
