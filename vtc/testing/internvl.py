"""A tiny offline InternVL (`InternVLForConditionalGeneration`) and processor, for tests and demos.

Real transformers classes with random weights. The tokenizer is `vtc.testing.tiny_tokenizer` plus InternVL's
special tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`, `<video>`); the image processor is the PIL
`GotOcr2ImageProcessorPil` (InternVL's own) built from its config, with `crop_to_patches=True` as the
InternVL processor sets it. torchvision is not needed: videos are small generated frame stacks, each frame
one tile, expanded the way `InternVLProcessor.replace_video_token` does (`internvl_video_inputs`).

Sizes: 64 px tiles with 8 px patches, so a tile is an 8 x 8 patch grid (+ [CLS]); pixel shuffle
(downsample_ratio 0.5) makes it a 4 x 4 grid of 16 visual tokens. With `max_patches=4`, a 128 x 64
(width x height) picture is cut in 1 x 2 tiles (rows x columns) plus a thumbnail: 48 visual tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .llava import make_image, tiny_llava_config, tiny_tokenizer

if TYPE_CHECKING:
    from transformers import (
        BatchEncoding,
        BatchFeature,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        PreTrainedTokenizerFast,
    )

START_IMAGE, END_IMAGE, CONTEXT_IMAGE, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
TILE_SIZE = 64
PATCH_SIZE = 8
TOKENS_PER_TILE = (TILE_SIZE // PATCH_SIZE // 2) ** 2
MAX_TILES = 4

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """`vtc.testing.tiny_tokenizer` plus InternVL's special tokens, exposed as the InternVL processor reads them
    (`start_image_token`, `end_image_token`, `context_image_token`, `video_token` and their `*_id`)."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [START_IMAGE, END_IMAGE, CONTEXT_IMAGE, VIDEO]})
    for name, token in [
        ("start_image_token", START_IMAGE),
        ("end_image_token", END_IMAGE),
        ("context_image_token", CONTEXT_IMAGE),
        ("video_token", VIDEO),
    ]:
        setattr(tok, name, token)
        setattr(tok, f"{name}_id", tok.convert_tokens_to_ids(token))
    return tok


def tiny_internvl(
    text_backbone: str = "qwen2",
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_feature_layer: int = -1,
    use_qk_norm: bool = False,
    vision_layers: int = 4,
) -> InternVLForConditionalGeneration:
    """A tiny random-weight `InternVLForConditionalGeneration` (InternViT with [CLS], pixel shuffle, Qwen2 or
    Llama decoder) in eval mode. The [CLS] token and position embeddings, zeros at init in transformers, are
    drawn at random so the [CLS] attention is not uniform."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    tok = tiny_internvl_tokenizer()
    base = tiny_llava_config(text_backbone, vocab_size=len(tok))
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        use_qk_norm=use_qk_norm,
        initializer_range=0.1,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=base.text_config,
        image_token_id=tok.context_image_token_id,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.cls_token.normal_(0.0, 1.0)
        embeddings.position_embeddings.normal_(0.0, 0.5)
    return model.eval()


def tiny_internvl_processor(max_patches: int = MAX_TILES) -> InternVLProcessor:
    """An offline `InternVLProcessor` for images matching `tiny_internvl` (no video processor: it needs
    torchvision; videos go through `internvl_video_inputs`)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, crop_to_patches=True, min_patches=1, max_patches=max_patches
    )

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        """Without the video processor (it needs torchvision); videos go through `internvl_video_inputs`."""

        video_processor = None

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tiny_internvl_tokenizer(),
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def _prompts(processor, questions: list[str], parts: list[list[str]]) -> list[str]:
    texts = []
    for q, kinds in zip(questions, parts):
        content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": q}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    return texts


def internvl_inputs(processor, questions: list[str], images: list[list[Image.Image]] | None = None) -> BatchFeature:
    """Batch of InternVL prompts (left padded); images[i] are the images of sample i (may be empty)."""
    images = images if images is not None else [[] for _ in questions]
    texts = _prompts(processor, questions, [["image"] * len(imgs) for imgs in images])
    flat = [image for imgs in images for image in imgs]
    kwargs = {"images": flat} if flat else {}
    return processor(text=texts, return_tensors="pt", padding=True, **kwargs)


def make_wide_image(seed: int = 0, size: tuple[int, int] = (128, 64)) -> Image.Image:
    """`vtc.testing.make_image` resized to (width, height): 1 x 2 tiles + a thumbnail at the default sizes."""
    return make_image(seed).resize(size)


def make_video(seed: int = 0, frames: int = 3, size: int = 64) -> list[Image.Image]:
    """A short generated clip: a picture whose content shifts a little from frame to frame."""
    base = make_image(seed, size=size + 2 * frames)
    return [base.crop((2 * t, t, 2 * t + size, t + size)) for t in range(frames)]


def internvl_video_inputs(processor, questions: list[str], videos: list[list[Image.Image]]) -> BatchEncoding:
    """Batch of one-video prompts, as `InternVLProcessor` builds them without its video processor (which needs
    torchvision), for clips of different lengths in one batch (`vtc.video.FramesVideoProcessor` stacks equal
    lengths only): every frame is one tile, resized and normalised by the image processor's own settings, and
    the `<video>` placeholder becomes "Frame1: <img>...</img>\\nFrame2: ..." (`replace_video_token`). The model
    receives the frames in `pixel_values`, like images of one tile each."""
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    clips = []
    for frames in videos:
        arrays = [np.asarray(f.convert("RGB").resize((TILE_SIZE, TILE_SIZE), Image.BICUBIC)) for f in frames]
        pixels = torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        clips.append((pixels - mean) / std)
    texts = _prompts(processor, questions, [["video"]] * len(videos))
    expanded = []
    for text, clip in zip(texts, clips):
        frames = processor.replace_video_token({"pixel_values_videos": [clip]}, 0)
        expanded.append(text.replace(processor.video_token, frames))
    inputs = processor.tokenizer(expanded, return_tensors="pt", padding=True)
    inputs["pixel_values"] = torch.cat(clips)
    return inputs
