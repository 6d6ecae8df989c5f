"""A tiny open_clip model (random weights, built from a config registered here), for QuoTA's `scorer="clip"`.

Needs the `clip` extra (open_clip_torch, which needs torchvision): `make clip-setup` builds `.venv-clip` with it.
The tokenizer is open_clip's own BPE tokenizer, whose vocabulary ships inside the package: nothing is downloaded.
"""

from __future__ import annotations

import torch

TINY_CLIP = "vtc-tiny-clip"
# open_clip's CLIP config schema (as its model_configs/*.json): a 2-layer ViT on 32 px images with 8 px patches and
# a 2-layer text transformer over open_clip's full BPE vocabulary (the bundled tokenizer's ids), 32-d embeddings
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_open_clip(seed: int = 0, name: str = TINY_CLIP) -> tuple[torch.nn.Module, object, object]:
    """(model, tokenizer, preprocess) of a random-weight open_clip CLIP built from TINY_CLIP_CONFIG (or of the
    registered open_clip architecture `name`, e.g. "ViT-B-32", with random weights), in eval mode."""
    from ..strategies.quota import import_open_clip

    open_clip = import_open_clip()
    if name == TINY_CLIP:
        open_clip.factory._MODEL_CONFIGS.setdefault(TINY_CLIP, TINY_CLIP_CONFIG)  # open_clip's own config registry
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), open_clip.get_tokenizer(name), preprocess
