"""Tiny models and processors built fully offline, for tests, demos and notebooks.

Every builder makes a real transformers class with random weights, small enough to run on a CPU in
milliseconds. Nothing is downloaded: the tokenizer is trained on a few sentences with the `tokenizers`
package and the image processor is made from its config.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image, ImageDraw

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = [
    "USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "Describe the picture in detail, please. There are shapes of many colours: green, yellow, purple.",
    "How many objects are there? Three. Is there a triangle on the left or on the right?",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Where is the small object? Top, bottom, centre. Answer with one word.",
]

TEXT_BACKBONES = ("llama", "qwen2", "mistral")


@functools.cache
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = [chr(c) for c in range(32, 127)]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A BPE tokenizer trained offline on a few sentences (vocabulary of about 320 tokens)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    return tok


def tiny_llava_config(
    text_backbone: str = "llama",
    *,
    image_size: int = 84,
    patch_size: int = 14,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    text_layers: int = 4,
    text_hidden: int = 64,
    vision_feature_select_strategy: str = "default",
    vision_feature_layer: int = -2,
    initializer_range: float = 0.1,
    vocab_size: int | None = None,
):
    """Config of a tiny `LlavaForConditionalGeneration` (CLIP ViT with [CLS] + a Llama/Qwen2/Mistral decoder)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig, Qwen2Config

    tok = tiny_tokenizer()
    vocab = vocab_size or len(tok)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    common = dict(
        vocab_size=vocab,
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if text_backbone == "llama":
        text = LlamaConfig(**common)
    elif text_backbone == "qwen2":
        text = Qwen2Config(**common, use_sliding_window=False)
    elif text_backbone == "mistral":
        text = MistralConfig(**common, sliding_window=None)
    else:
        raise ValueError(f"unknown text backbone {text_backbone!r}; known: {', '.join(TEXT_BACKBONES)}")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        initializer_range=initializer_range,
    )


def tiny_llava(
    text_backbone: str = "llama", *, seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs
):
    """A tiny random-weight `LlavaForConditionalGeneration` in eval mode (fp32)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_llava_config(text_backbone, **config_kwargs)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tiny_llava_processor(image_size: int = 84, patch_size: int = 14, vision_feature_select_strategy="default"):
    """An offline `LlavaProcessor` matching `tiny_llava` (LLaVA-1.5 chat format)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def make_image(seed: int = 0, size: int = 96) -> Image.Image:
    """A small synthetic picture: a textured background with a few coloured shapes."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(3, generator=g) * 120 + 40).to(torch.uint8)
    noise = (torch.rand(size, size, 3, generator=g) * 40).to(torch.uint8)
    img = Image.fromarray((noise + base).numpy())
    draw = ImageDraw.Draw(img)
    colours = ["red", "blue", "green", "yellow", "purple", "white"]
    for i in range(3):
        x, y = (torch.rand(2, generator=g) * (size - 24)).tolist()
        r = 6 + float(torch.rand(1, generator=g)) * 12
        colour = colours[int(torch.randint(len(colours), (1,), generator=g))]
        box = [x, y, x + r, y + r]
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
    return img


def llava_inputs(processor, questions: list[str], images: list[list[Image.Image]] | None = None):
    """Batch of LLaVA-1.5 prompts (left padded). images[i] lists the images of sample i (may be empty)."""
    texts = []
    flat_images = []
    for i, q in enumerate(questions):
        imgs = images[i] if images is not None else []
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": q}]
        messages = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        flat_images.extend(imgs)
    kwargs = {"images": flat_images} if flat_images else {}
    return processor(text=texts, return_tensors="pt", padding=True, **kwargs)


def tiny_vlm_dir():
    """Where the trained tiny VLM's files live: assets/tiny_vlm at the repository root (a `pathlib.Path`)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "assets" / "tiny_vlm"


def load_tiny_vlm(path: str | None = None) -> tuple:
    """The tiny LLaVA trained on `vtc.data`'s synthetic grounding task (eval/train_tiny_vlm.py), fully offline.

    Returns (model, processor): a `LlavaForConditionalGeneration` in fp32 and eval mode (CLIP ViT with [CLS],
    224 px, 16 px patches: 196 visual tokens; Llama decoder) and a `LlavaProcessor` (word-level tokenizer,
    left padding, CLIP preprocessing on the PIL backend). `path` is a directory (default `tiny_vlm_dir()`). Usage:

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt", padding=True)
        new = model.generate(**inputs, max_new_tokens=2)[:, inputs["input_ids"].shape[1]:]
        answer = processor.batch_decode(new, skip_special_tokens=True)[0]
    """
    from pathlib import Path

    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path) if path is not None else tiny_vlm_dir()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no trained tiny VLM at {path}: run `python eval/train_tiny_vlm.py` to make it")
    image_processor = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
    processor = LlavaProcessor.from_pretrained(path, image_processor=image_processor, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return model.eval(), processor
