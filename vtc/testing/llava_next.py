"""Tiny offline LLaVA-NeXT and LLaVA-OneVision models and processors (tests, demos).

Real transformers classes with random weights; the tokenizer is `vtc.testing.tiny_tokenizer` (with a
`<video>` token added for OneVision) and the image processors are the PIL ones, built from their config.
torchvision is not needed: OneVision videos are small generated frame stacks, preprocessed frame by frame
with the image processor (`onevision_video_inputs`), since transformers' video processors need torchvision.

Sizes: 42 px vision inputs with 14 px patches, so every base image or crop is a 3 x 3 token grid; the grid
pinpoints allow 1 x 2, 2 x 1 and 2 x 2 crops of 42 px. A 96 x 64 (width x height) picture is cut in 2 x 2
crops whose 6 x 6 token grid is unpadded to 4 x 6 (one row of padding dropped above and below).
"""

from __future__ import annotations

import torch
from PIL import Image

from .llava import IMAGE_TOKEN, make_image, tiny_llava_config, tiny_tokenizer

VIDEO_TOKEN = "<video>"
IMAGE_SIZE = 42
PATCH_SIZE = 14
PINPOINTS = [[42, 84], [84, 42], [84, 84]]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_onevision_tokenizer():
    """`vtc.testing.tiny_tokenizer` plus a `<video>` special token."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    tok.video_token = VIDEO_TOKEN
    tok.video_token_id = tok.convert_tokens_to_ids(VIDEO_TOKEN)
    return tok


def tiny_llava_next(text_backbone: str = "llama", *, seed: int = 0, attn_implementation: str = "sdpa", **kwargs):
    """A tiny random-weight `LlavaNextForConditionalGeneration` (CLIP ViT with [CLS], anyres) in eval mode."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = tiny_llava_config(text_backbone, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **kwargs)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=base.vision_feature_layer,
        image_grid_pinpoints=PINPOINTS,
        initializer_range=base.initializer_range,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tiny_llava_next_processor():
    """An offline `LlavaNextProcessor` matching `tiny_llava_next` (PIL image processor, LLaVA chat format)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def tiny_llava_onevision(
    text_backbone: str = "qwen2",
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_aspect_ratio: str = "anyres_max_9",
    **kwargs,
):
    """A tiny random-weight `LlavaOnevisionForConditionalGeneration` (SigLIP tower: no [CLS]) in eval mode.

    `vision_aspect_ratio="anyres_max_1"` makes the unpadded crop grid larger than allowed, so the model
    downsamples it (bilinear), as the real model does for large images."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    tok = tiny_onevision_tokenizer()
    base = tiny_llava_config(text_backbone, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vocab_size=len(tok), **kwargs)
    clip = base.vision_config
    vision = SiglipVisionConfig(
        hidden_size=clip.hidden_size,
        intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_hidden_layers,
        num_attention_heads=clip.num_attention_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=base.text_config,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tok.video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=vision_aspect_ratio,
        image_grid_pinpoints=PINPOINTS,
        initializer_range=base.initializer_range,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tiny_llava_onevision_processor(vision_aspect_ratio: str = "anyres_max_9"):
    """An offline `LlavaOnevisionProcessor` for images (no video processor: see `onevision_video_inputs`)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=PINPOINTS
    )

    class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
        """Without the video processor (it needs torchvision); videos go through `onevision_video_inputs`."""

        video_processor = None

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnlyOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tiny_onevision_tokenizer(),
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio=vision_aspect_ratio,
    )


def make_wide_image(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """`vtc.testing.make_image` resized to (width, height): non-square, so anyres unpads its crop grid."""
    return make_image(seed).resize(size)


def make_video(seed: int = 0, frames: int = 3, size: int = 48) -> list[Image.Image]:
    """A short generated clip: a picture whose content shifts a little from frame to frame."""
    base = make_image(seed, size=size + 2 * frames)
    return [base.crop((2 * t, t, 2 * t + size, t + size)) for t in range(frames)]


def _prompts(processor, questions, parts):
    texts = []
    for q, kinds in zip(questions, parts):
        content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": q}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    return texts


def next_inputs(processor, questions: list[str], images: list[list[Image.Image]] | None = None):
    """Batch of prompts (left padded) for LLaVA-NeXT or OneVision; images[i] are the images of sample i."""
    images = images if images is not None else [[] for _ in questions]
    texts = _prompts(processor, questions, [["image"] * len(imgs) for imgs in images])
    if not any(images):
        return processor(text=texts, return_tensors="pt", padding=True)
    if not hasattr(processor, "video_token"):
        return processor(text=texts, return_tensors="pt", padding=True, images=[i for imgs in images for i in imgs])
    # OneVision: a sample with several images takes them without crops, so the image processor needs the
    # nesting, which the processor's own __call__ flattens away in transformers 5.23: expand the
    # placeholders here with the processor's own `replace_image_token`.
    processed = processor.image_processor([imgs for imgs in images if imgs], return_tensors="pt")
    expanded, index = [], 0
    for text in texts:
        head, *rest = text.split(IMAGE_TOKEN)
        for part in rest:
            head += processor.replace_image_token(processed, image_idx=index) + part
            index += 1
        expanded.append(head)
    inputs = processor.tokenizer(expanded, return_tensors="pt", padding=True)
    inputs.update(processed)
    return inputs


def onevision_video_inputs(processor, questions: list[str], videos: list[list[Image.Image]]):
    """Batch of one-video prompts for OneVision through the processor's own `__call__`, its video processor
    replaced by `vtc.video.FramesVideoProcessor` (transformers' needs torchvision): each frame is resized to the
    vision input size and normalised by the image processor's settings; the `<video>` placeholder is expanded to
    frames x ceil(side / 2)^2 + 1 tokens (the model pools each frame's grid 2x and appends one newline token)."""
    from ..video import ensure_video_processor

    texts = _prompts(ensure_video_processor(processor), questions, [["video"]] * len(videos))
    return processor(text=texts, videos=list(videos), return_tensors="pt", padding=True)
