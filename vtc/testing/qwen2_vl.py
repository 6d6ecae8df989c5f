"""Tiny Qwen2-VL / Qwen2.5-VL models and an offline processor, for tests and demos.

Everything is built offline: real transformers classes with random weights, a BPE tokenizer trained on a
few sentences with the `tokenizers` package, the Qwen2-VL image processor (PIL backend) made from its
config. Videos are small generated frame stacks, patchified by `vtc.video.FramesVideoProcessor` the way Qwen2-VL's
video processor does (pairs of frames form one temporal patch); its own video processor needs torchvision, which
must not be installed beside the CPU torch (DESIGN.md, section 7).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from ..video import FramesVideoProcessor
from .llava import _CORPUS, make_image

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN_SPECIAL_TOKENS = [
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
]
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
PATCH, MERGE, TEMPORAL = 14, 2, 2


@functools.cache
def _qwen_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=[chr(c) for c in range(32, 127)],
        show_progress=False,
    )
    tok.train_from_iterator([*_CORPUS, "user assistant system video frame"], trainer=trainer)
    return tok.to_str()


def tiny_qwen_tokenizer():
    """A BPE tokenizer with Qwen2-VL's special tokens (<|image_pad|>, <|video_pad|>, ...), left padding."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_qwen_tokenizer_json()),
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
    )


def special_token_ids(tok) -> dict[str, int]:
    """The config's ids of the vision tokens (image / video pads, vision start / end) in the tokenizer `tok`."""
    return dict(
        image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
    )


def _mrope_section(text_hidden: int) -> list[int]:
    pairs = text_hidden // 4 // 2  # 4 heads
    return [pairs // 4, 3 * pairs // 8, pairs - pairs // 4 - 3 * pairs // 8]


def tiny_qwen_vl_config(
    family: str = "qwen2_vl",
    *,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    text_layers: int = 4,
    text_hidden: int = 64,
    window_size: int = 56,
    fullatt_block_indexes: tuple[int, ...] = (1, 3),
    initializer_range: float = 0.1,
):
    """Config of a tiny Qwen2-VL (`family="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`, window attention in the
    vision blocks not listed in `fullatt_block_indexes`; a window is `window_size` px = 2x2 merged tokens)."""
    tok = tiny_qwen_tokenizer()
    text = dict(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        # t/h/w frequency pairs in Qwen2-VL's 2:3:3 split of head_dim / 2 ([2, 3, 3] at the default width; [16, 24,
        # 24] at head_dim 128, as Qwen2.5-VL-7B)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(text_hidden)},
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    common = special_token_ids(tok)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=vision_layers,
            embed_dim=vision_hidden,
            hidden_size=text_hidden,
            num_heads=4,
            mlp_ratio=2,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            initializer_range=initializer_range,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=vision_layers,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            out_hidden_size=text_hidden,
            num_heads=4,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            window_size=window_size,
            fullatt_block_indexes=list(fullatt_block_indexes),
            tokens_per_second=2,
            initializer_range=initializer_range,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(QWEN_FAMILIES)}")


def tiny_qwen_vl(family: str = "qwen2_vl", *, seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs):
    """A tiny random-weight `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (fp32, eval)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_qwen_vl_config(family, **config_kwargs)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    return cls._from_config(config, attn_implementation=attn_implementation).eval()


def _fill(sample: str, placeholder: str, fills: list[str]) -> str:
    """Replace each `placeholder` in `sample`, in order, by the next item popped from the front of `fills`."""
    parts, out = sample.split(placeholder), []
    for i, part in enumerate(parts):
        if i:
            out.append(fills.pop(0))
        out.append(part)
    return "".join(out)


class TinyQwenVLProcessor:
    """Offline stand-in for `Qwen2VLProcessor`: tokenizer + Qwen2-VL image processor (PIL backend) + a frame-stack
    video path. `__call__(text=[...], images=[...], videos=[...])` expands each <|image_pad|> / <|video_pad|>
    into grid_t * grid_h * grid_w / 4 tokens and returns input_ids, attention_mask, mm_token_type_ids,
    pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw (as HF's processor does)."""

    patch = PATCH  # px per patch side (Qwen3-VL's subclass uses 16)

    def __init__(
        self, min_pixels: int = 28 * 28, max_pixels: int = 28 * 28 * 16, tokenizer=None, **image_processor_kwargs
    ):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer if tokenizer is not None else tiny_qwen_tokenizer()
        self.image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            patch_size=self.patch,
            merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            **image_processor_kwargs,
        )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)

    def prompt(self, question: str, n_images: int = 0, n_videos: int = 0) -> str:
        vision = (
            f"{VISION_START}{IMAGE_PAD}{VISION_END}" * n_images + f"{VISION_START}{VIDEO_PAD}{VISION_END}" * n_videos
        )
        return f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"

    def _video(self, frames: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        out = FramesVideoProcessor(self.image_processor, "patches")([frames])
        return out["pixel_values_videos"], out["video_grid_thw"][0].tolist()

    def _video_text(self, grid: list[int]) -> str:
        """What one <|video_pad|> placeholder expands into: grid_t * grid_h * grid_w / 4 <|video_pad|> tokens."""
        t, h, w = grid
        return VIDEO_PAD * (t * h * w // MERGE**2)

    def __call__(self, text: list[str], images: list | None = None, videos: list | None = None, padding=True, **_):
        data: dict = {}
        image_texts, video_texts = [], []
        if images:
            out = self.image_processor(images=images, return_tensors="pt")
            data["pixel_values"], data["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
            image_texts = [IMAGE_PAD * n for n in (out["image_grid_thw"].prod(-1) // MERGE**2).tolist()]
        if videos:
            pixels, grids = zip(*(self._video(list(v)) for v in videos))
            data["pixel_values_videos"] = torch.cat(pixels)
            data["video_grid_thw"] = torch.tensor(grids)
            video_texts = [self._video_text(g) for g in grids]
        expanded = [_fill(_fill(sample, IMAGE_PAD, image_texts), VIDEO_PAD, video_texts) for sample in text]
        if image_texts or video_texts:
            raise ValueError("more images/videos than <|image_pad|>/<|video_pad|> placeholders in the text")
        enc = self.tokenizer(expanded, return_tensors="pt", padding=padding)
        ids = enc["input_ids"]
        types = torch.zeros_like(ids)
        types[ids == self.image_token_id] = 1
        types[ids == self.video_token_id] = 2
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": types, **data}

    def batch_decode(self, ids, **kwargs):
        return self.tokenizer.batch_decode(ids, **kwargs)


def tiny_qwen_processor(**kwargs) -> TinyQwenVLProcessor:
    return TinyQwenVLProcessor(**kwargs)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen2_vl_processor(
    min_pixels: int = 28 * 28, max_pixels: int = 28 * 28 * 16, tokenizer=None, image_processor=None
):
    """An offline `Qwen2VLProcessor` (the real class) for images, matching `tiny_qwen_vl`, with Qwen's chat format.
    It has no video processor (that needs torchvision, DESIGN.md section 7): `vtc.video.ensure_video_processor`
    gives it one. Its images give the same input_ids and pixel_values as `TinyQwenVLProcessor`. `tokenizer` and
    `image_processor` replace the tiny BPE tokenizer and the image processor made from min/max pixels."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Without the video processor (it needs torchvision)."""

        video_processor = None

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
        )
    return ImageOnlyQwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else tiny_qwen_tokenizer(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def tiny_video_vlm_dir():
    """Where the trained tiny video VLM lives (assets/tiny_video_vlm of the repository)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "assets" / "tiny_video_vlm"


def load_tiny_video_vlm(path=None) -> tuple:
    """The tiny Qwen2-VL trained on `vtc.data`'s moving-shapes clips (eval/train_tiny_video_vlm.py), offline.

    Returns (model, processor): a `Qwen2VLForConditionalGeneration` in fp32 and eval mode (8 frames of 112 px,
    14 px patches, temporal patches of 2 frames, 2x2 merge: 64 visual tokens a clip) and a `Qwen2VLProcessor`
    (word-level tokenizer, left padding, Qwen chat template) with a `FramesVideoProcessor` for videos. Usage:

        clip = vtc.data.make_video_qa(1, vtc.data.HELDOUT_SEED)[0]
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": clip["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], videos=[clip["video"]], return_tensors="pt", padding=True)
        new = model.generate(**inputs, max_new_tokens=2)[:, inputs["input_ids"].shape[1]:]
        answer = processor.batch_decode(new, skip_special_tokens=True)[0]
    """
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..video import ensure_video_processor

    path = Path(path) if path is not None else tiny_video_vlm_dir()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no trained tiny video VLM at {path}: run `python eval/train_tiny_video_vlm.py`")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    processor = ensure_video_processor(tiny_qwen2_vl_processor(tokenizer=tokenizer, image_processor=image_processor))
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return model.eval(), processor


def make_video(seed: int = 0, frames: int = 4, size: tuple[int, int] = (56, 84)) -> list[Image.Image]:
    """A short clip: a synthetic picture whose shapes drift a few pixels per frame (PIL frames, (h, w))."""
    base = np.asarray(make_image(seed, size=max(size) + 4 * frames))
    h, w = size
    return [Image.fromarray(base[2 * f : 2 * f + h, 3 * f : 3 * f + w].copy()) for f in range(frames)]


def qwen_inputs(processor: TinyQwenVLProcessor, questions: list[str], images=None, videos=None) -> dict:
    """Batch of chat prompts (left padded). images[i] / videos[i] list sample i's images / videos (may be empty);
    each sample shows its images first, then its videos, then the question."""
    texts, flat_images, flat_videos = [], [], []
    for i, q in enumerate(questions):
        imgs = images[i] if images is not None else []
        vids = videos[i] if videos is not None else []
        texts.append(processor.prompt(q, len(imgs), len(vids)))
        flat_images.extend(imgs)
        flat_videos.extend(vids)
    return processor(text=texts, images=flat_images or None, videos=flat_videos or None)
