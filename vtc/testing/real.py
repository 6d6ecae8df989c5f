"""Real architectures with random weights, built offline: `real_config`, `real_processor`, `real_model`.

The configs carry the published values of each checkpoint's `config.json` on the Hugging Face hub (widths, heads,
key/value heads, intermediate sizes, vision towers, image and patch sizes, feature layers, anyres pinpoints,
spatial merge, window attention, pixel shuffle, rope settings, special token ids); only the depth is cut on
request (`text_layers`, `vision_layers`). The processors are the real processor classes with the real image
processor settings (PIL backends: torchvision must not be installed beside the CPU torch, DESIGN.md section 7)
and a small BPE tokenizer trained here on a few sentences that carries the real special tokens AT THEIR REAL
IDS, so input ids, placeholders and token counts are those of the real checkpoints. Nothing is downloaded.

    from vtc.testing import real_model, real_inputs
    model, processor = real_model("llava-1.5-7b", text_layers=2)        # CLIP-L/336 + 4096-wide Llama, 2 layers
    inputs = real_inputs("llava-1.5-7b", processor, ["What is it?"], [[image]])   # 576 <image> tokens

Names: see `REAL_NAMES`. Sources (hub `config.json` / `preprocessor_config.json` / `tokenizer_config.json`):
llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llava-onevision-qwen2-0.5b-ov-hf,
Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-2B-Instruct,
OpenGVLab/InternVL3-1B-hf.
"""

from __future__ import annotations

import functools
import json

import torch
from PIL import Image

from .llava import _CORPUS, LLAVA_CHAT_TEMPLATE

# --- special tokens at their real ids (tokenizer_config.json "added_tokens_decoder" of each checkpoint) ---
_LLAMA_SPECIALS = (("<unk>", 0), ("<s>", 1), ("</s>", 2), ("<image>", 32000), ("<pad>", 32001))
_QWEN_SPECIALS = (
    ("<|endoftext|>", 151643),
    ("<|im_start|>", 151644),
    ("<|im_end|>", 151645),
    ("<|vision_start|>", 151652),
    ("<|vision_end|>", 151653),
    ("<|vision_pad|>", 151654),
    ("<|image_pad|>", 151655),
    ("<|video_pad|>", 151656),
)
_ONEVISION_SPECIALS = (
    ("<|endoftext|>", 151643),
    ("<|im_start|>", 151644),
    ("<|im_end|>", 151645),
    ("<image>", 151646),
    ("<video>", 151647),
)
# InternVL3's Qwen2.5 vocabulary plus <img> </img> <IMG_CONTEXT> (151665-151667). `<video>` is only a text
# placeholder the processor replaces by per-frame <img>...</img> blocks: it gets an ordinary id here.
_INTERNVL_SPECIALS = (
    ("<|endoftext|>", 151643),
    ("<|im_start|>", 151644),
    ("<|im_end|>", 151645),
    ("<img>", 151665),
    ("</img>", 151666),
    ("<IMG_CONTEXT>", 151667),
)

_QWEN_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_placeholder }}"
    "{% elif part['type'] == 'video' %}{{ video_placeholder }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# OneVision and InternVL-hf: the Qwen chat format with their image placeholders (the hub templates differ in
# whitespace and system prompts, which changes no visual token)
_ONEVISION_CHAT = _QWEN_CHAT.replace("{{ image_placeholder }}", "<image>\n").replace(
    "{{ video_placeholder }}", "<video>\n"
)
# (InternVL: <IMG_CONTEXT> per image, which the processor expands to <img>...</img> blocks)
_INTERNVL_CHAT = _QWEN_CHAT.replace("{{ image_placeholder }}", "<IMG_CONTEXT>\n").replace(
    "{{ video_placeholder }}", "<video>\n"
)
# llava-v1.6-mistral's template: "[INST] <image>\nWhat is shown in this image? [/INST]"
_MISTRAL_CHAT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} [/INST]{% else %}</s>{% endif %}{% endfor %}"
)

CLIP_L_336 = dict(  # openai/clip-vit-large-patch14-336, the tower of LLaVA-1.5 and LLaVA-NeXT
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _qwen2_text(hidden, intermediate, layers, heads, kv_heads, vocab, max_positions, tie):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=tie,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )


def _specs() -> dict[str, dict]:
    """Per name: the model class, the published config (full depth) and the processor settings."""
    qwen_ids = dict(
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
    )
    qwen2_mrope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    qwen25_vision = dict(  # Qwen2.5-VL-3B and -7B share the tower: 32 blocks, windows of 112 px, 4 full blocks
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        hidden_act="silu",
        in_channels=3,
    )
    return {
        # llava-hf/llava-1.5-7b-hf: CLIP-L/336 (576 patches + [CLS], feature layer -2) + Vicuna-7B (Llama)
        "llava-1.5-7b": dict(
            family="llava",
            config=dict(
                vision_config=dict(model_type="clip_vision_model", **CLIP_L_336),
                text_config=dict(
                    model_type="llama",
                    vocab_size=32064,
                    hidden_size=4096,
                    intermediate_size=11008,
                    num_hidden_layers=32,
                    num_attention_heads=32,
                    num_key_value_heads=32,
                    max_position_embeddings=4096,
                    rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    pad_token_id=32001,
                    bos_token_id=1,
                    eos_token_id=2,
                ),
                image_token_id=32000,
                projector_hidden_act="gelu",
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
                tie_word_embeddings=False,
            ),
            specials=_LLAMA_SPECIALS,
        ),
        # llava-hf/llava-v1.6-mistral-7b-hf: CLIP-L/336 anyres (5 pinpoints) + Mistral-7B-Instruct-v0.2
        "llava-v1.6-mistral-7b": dict(
            family="llava_next",
            config=dict(
                vision_config=dict(model_type="clip_vision_model", **CLIP_L_336),
                text_config=dict(
                    model_type="mistral",
                    vocab_size=32064,
                    hidden_size=4096,
                    intermediate_size=14336,
                    num_hidden_layers=32,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    max_position_embeddings=32768,
                    rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                    sliding_window=None,
                    pad_token_id=32001,
                    bos_token_id=1,
                    eos_token_id=2,
                ),
                image_token_id=32000,
                image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                projector_hidden_act="gelu",
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
                tie_word_embeddings=False,
            ),
            specials=_LLAMA_SPECIALS,
        ),
        # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m/384 without its last layer (26 of 27, no head,
        # no [CLS]; 729 tokens per crop) + Qwen2-0.5B; anyres_max_9 over a 6 x 6 grid of 384 px pinpoints
        "llava-onevision-qwen2-0.5b": dict(
            family="llava_onevision",
            config=dict(
                vision_config=dict(
                    model_type="siglip_vision_model",
                    hidden_size=1152,
                    intermediate_size=4304,
                    num_hidden_layers=26,
                    num_attention_heads=16,
                    image_size=384,
                    patch_size=14,
                    hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6,
                    vision_use_head=False,
                ),
                text_config=dict(
                    model_type="qwen2",
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                    use_sliding_window=False,
                    **_qwen2_text(896, 4864, 24, 14, 2, 152000, 32768, True),
                ),
                image_token_id=151646,
                video_token_id=151647,
                vision_aspect_ratio="anyres_max_9",
                vision_feature_layer=-1,
                vision_feature_select_strategy="full",
                projector_hidden_act="gelu",
                tie_word_embeddings=True,
            ),
            specials=_ONEVISION_SPECIALS,
        ),
        # Qwen/Qwen2-VL-2B-Instruct: 32-block ViT (1280 wide, 14 px patches, 2x2 merge) + Qwen2-1.5B, M-RoPE 16/24/24
        "qwen2-vl-2b": dict(
            family="qwen2_vl",
            config=dict(
                text_config=dict(
                    rope_parameters=qwen2_mrope, **_qwen2_text(1536, 8960, 28, 12, 2, 151936, 32768, True)
                ),
                vision_config=dict(
                    depth=32,
                    embed_dim=1280,
                    hidden_size=1536,
                    mlp_ratio=4,
                    num_heads=16,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                    hidden_act="quick_gelu",
                    in_channels=3,
                ),
                tie_word_embeddings=True,
                **qwen_ids,
            ),
            specials=_QWEN_SPECIALS,
        ),
        # Qwen/Qwen2.5-VL-3B-Instruct: windowed 32-block ViT (full attention in blocks 7, 15, 23, 31) + 36 x 2048
        "qwen2.5-vl-3b": dict(
            family="qwen2_5_vl",
            config=dict(
                text_config=dict(
                    rope_parameters=qwen2_mrope, **_qwen2_text(2048, 11008, 36, 16, 2, 151936, 128000, True)
                ),
                vision_config=dict(out_hidden_size=2048, **qwen25_vision),
                tie_word_embeddings=True,
                **qwen_ids,
            ),
            specials=_QWEN_SPECIALS,
        ),
        # Qwen/Qwen2.5-VL-7B-Instruct: the same tower + 28 x 3584 (28 heads, 4 key/value heads), untied head
        "qwen2.5-vl-7b": dict(
            family="qwen2_5_vl",
            config=dict(
                text_config=dict(
                    rope_parameters=qwen2_mrope, **_qwen2_text(3584, 18944, 28, 28, 4, 152064, 128000, False)
                ),
                vision_config=dict(out_hidden_size=3584, **qwen25_vision),
                tie_word_embeddings=False,
                **qwen_ids,
            ),
            specials=_QWEN_SPECIALS,
        ),
        # Qwen/Qwen3-VL-2B-Instruct: 24-block ViT (16 px patches, learned 48 x 48 position grid, DeepStack from
        # blocks 5, 11, 17) + Qwen3-1.7B-style text (head_dim 128, interleaved M-RoPE 24/20/20, theta 5e6)
        "qwen3-vl-2b": dict(
            family="qwen3_vl",
            config=dict(
                text_config=dict(
                    head_dim=128,
                    rope_parameters={
                        "rope_type": "default",
                        "rope_theta": 5000000.0,
                        "mrope_section": [24, 20, 20],
                        "mrope_interleaved": True,
                    },
                    attention_bias=False,
                    **_qwen2_text(2048, 6144, 28, 16, 8, 151936, 262144, True),
                ),
                vision_config=dict(
                    depth=24,
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_heads=16,
                    out_hidden_size=2048,
                    patch_size=16,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                    num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17],
                    hidden_act="gelu_pytorch_tanh",
                    in_channels=3,
                ),
                tie_word_embeddings=True,
                **qwen_ids,
            ),
            specials=_QWEN_SPECIALS,
        ),
        # OpenGVLab/InternVL3-1B-hf: InternViT-300M-448px-V2.5 ([CLS], 448 px tiles, 14 px patches, pixel shuffle
        # 0.5: 256 tokens per tile, up to 12 tiles + thumbnail) + Qwen2.5-0.5B (dynamic-NTK rope, factor 2)
        "internvl3-1b": dict(
            family="internvl",
            config=dict(
                vision_config=dict(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    image_size=[448, 448],
                    patch_size=[14, 14],
                    use_qk_norm=False,
                    layer_scale_init_value=0.1,
                    norm_type="layer_norm",
                    layer_norm_eps=1e-6,
                    use_mean_pooling=True,
                    hidden_act="gelu",
                ),
                text_config=dict(
                    model_type="qwen2",
                    rope_parameters={"rope_type": "dynamic", "rope_theta": 1000000.0, "factor": 2.0},
                    use_sliding_window=False,
                    **_qwen2_text(896, 4864, 24, 14, 2, 151674, 32768, False),
                ),
                image_token_id=151667,
                image_seq_length=256,
                downsample_ratio=0.5,
                projector_hidden_act="gelu",
                vision_feature_layer=-1,
                vision_feature_select_strategy="default",
                tie_word_embeddings=False,
            ),
            specials=_INTERNVL_SPECIALS,
        ),
    }


REAL_NAMES = tuple(_specs())


def _spec(name: str) -> dict:
    specs = _specs()
    if name not in specs:
        raise ValueError(f"unknown real architecture {name!r}; known: {', '.join(specs)}")
    return specs[name]


def _cut(depth: int, layers: int | None, what: str) -> int:
    if layers is None:
        return depth
    if not 1 <= int(layers) <= depth:
        raise ValueError(f"{what} must be in [1, {depth}] (the published depth), got {layers}")
    return int(layers)


def real_config(name: str, text_layers: int | None = 2, vision_layers: int | None = None):
    """The published config of `name` (see `REAL_NAMES`) with its depth cut: `text_layers` decoder layers (None:
    all), `vision_layers` vision blocks (None: all). Cutting the tower keeps only the layer indexes that still
    exist: Qwen2.5-VL's full-attention blocks (the last block becomes one if none is left) and Qwen3-VL's
    DeepStack taps."""
    import copy

    from transformers import (
        InternVLConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen3VLConfig,
    )

    spec = _spec(name)
    config = copy.deepcopy(spec["config"])
    text, vision = config["text_config"], config["vision_config"]
    text["num_hidden_layers"] = _cut(text["num_hidden_layers"], text_layers, "text_layers")
    depth_key = "depth" if "depth" in vision else "num_hidden_layers"
    depth = _cut(vision[depth_key], vision_layers, "vision_layers")
    vision[depth_key] = depth
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < depth] or [depth - 1]
    if "deepstack_visual_indexes" in vision:
        vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"] if i < depth]
    cls = {
        "llava": LlavaConfig,
        "llava_next": LlavaNextConfig,
        "llava_onevision": LlavaOnevisionConfig,
        "qwen2_vl": Qwen2VLConfig,
        "qwen2_5_vl": Qwen2_5_VLConfig,
        "qwen3_vl": Qwen3VLConfig,
        "internvl": InternVLConfig,
    }[spec["family"]]
    return cls(**config)


# the image side (px) the benchmarks feed each architecture: its native input side for the fixed-size towers;
# for the dynamic-resolution Qwen-VL families the side that gives 576 visual tokens, as LLaVA-1.5 has
_IMAGE_SIZES = {
    "llava": 336,
    "llava_next": 336,
    "llava_onevision": 384,
    "qwen2_vl": 672,
    "qwen2_5_vl": 672,
    "qwen3_vl": 768,
    "internvl": 448,
}


def real_image_size(name: str) -> int:
    """The square image side the benchmarks use for `name` (LLaVA-1.5: 336 px, 576 tokens; Qwen2-VL / 2.5-VL:
    672 px and Qwen3-VL: 768 px, also 576 tokens; InternVL3: one 448 px tile, 256 tokens; ...)."""
    return _IMAGE_SIZES[real_family(name)]


def real_family(name: str) -> str:
    """The vtc adapter family of a real architecture name (llava, llava_next, llava_onevision, qwen2_vl, ...)."""
    return _spec(name)["family"]


@functools.cache
def _tokenizer_json(specials: tuple[tuple[str, int], ...]) -> str:
    """A BPE trained on a few sentences, its special tokens moved to the real ids (ordinary tokens after the
    lowest ones, so no id is taken twice)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>"],
        initial_alphabet=[chr(c) for c in range(32, 127)],
        show_progress=False,
    )
    tok.train_from_iterator([*_CORPUS, "user assistant system video frame seconds"], trainer=trainer)
    data = json.loads(tok.to_str())
    real = dict(specials)
    ordinary = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in real]
    start = max((i for i in real.values() if i < 1000), default=-1) + 1
    vocab = {t: start + i for i, t in enumerate(ordinary)}
    if max(vocab.values()) >= min(i for i in real.values() if i >= 1000):
        raise AssertionError("ordinary token ids reach the special ids")
    vocab.update(real)
    data["model"]["vocab"] = vocab
    added = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    data["added_tokens"] = [{"id": i, "content": t, **added} for t, i in specials]
    return json.dumps(data)


def real_tokenizer(name: str):
    """A small offline tokenizer (left padding) whose special tokens have the real checkpoint's ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    specials = _spec(name)["specials"]
    tokens = dict(specials)
    llama = "<s>" in tokens
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(specials)),
        unk_token="<unk>",
        pad_token="<pad>" if llama else "<|endoftext|>",
        bos_token="<s>" if llama else None,
        eos_token="</s>" if llama else "<|im_end|>",
        padding_side="left",
    )
    if "<image>" in tokens:
        tok.image_token, tok.image_token_id = "<image>", tokens["<image>"]
    return tok


def real_processor(name: str):
    """The processor of `name`: the real processor class (offline stand-ins for Qwen-VL, as in
    `vtc.testing.qwen2_vl`) with the published image-processor settings and `real_tokenizer(name)`."""
    spec = _spec(name)
    family = spec["family"]
    tok = real_tokenizer(name)
    if family in ("llava", "llava_next"):
        from transformers import LlavaNextProcessor, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        size = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        common = dict(tokenizer=tok, patch_size=14, vision_feature_select_strategy="default")
        if family == "llava":  # preprocessor_config.json: CLIPImageProcessor, resize 336 + centre crop 336
            return LlavaProcessor(
                image_processor=CLIPImageProcessorPil(**size),
                chat_template=LLAVA_CHAT_TEMPLATE,
                num_additional_image_tokens=1,
                **common,
            )
        ip = LlavaNextImageProcessorPil(**size, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
        return LlavaNextProcessor(
            image_processor=ip, chat_template=_MISTRAL_CHAT, num_additional_image_tokens=1, **common
        )
    if family == "llava_onevision":
        from .llava_next import tiny_llava_onevision_processor

        processor = tiny_llava_onevision_processor()  # the image-only subclass; replace its parts by the real ones
        ip = processor.image_processor
        ip.size, ip.image_mean, ip.image_std = {"height": 384, "width": 384}, [0.5] * 3, [0.5] * 3
        ip.image_grid_pinpoints = real_config(name).image_grid_pinpoints
        tok.video_token, tok.video_token_id = "<video>", 151647
        processor.tokenizer, processor.chat_template = tok, _ONEVISION_CHAT
        processor.image_token_id, processor.video_token_id = 151646, 151647
        processor.num_image_tokens = (384 // 14) ** 2  # 729
        return processor
    if family == "internvl":
        from .internvl import tiny_internvl_processor

        processor = tiny_internvl_processor(max_patches=12)
        ip = processor.image_processor
        ip.size = {"height": 448, "width": 448}
        ip.image_mean, ip.image_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet, as InternVL
        for attr, token in [
            ("start_image_token", "<img>"),
            ("end_image_token", "</img>"),
            ("context_image_token", "<IMG_CONTEXT>"),
        ]:
            setattr(tok, attr, token)
            setattr(tok, f"{attr}_id", tok.convert_tokens_to_ids(token))
            setattr(processor, attr, token)
            setattr(processor, f"{attr}_id", tok.convert_tokens_to_ids(token))
        tok.add_special_tokens({"additional_special_tokens": ["<video>"]})
        tok.video_token, tok.video_token_id = "<video>", tok.convert_tokens_to_ids("<video>")
        processor.tokenizer, processor.chat_template, processor.image_seq_length = tok, _INTERNVL_CHAT, 256
        processor.image_token_id = 151667
        return processor
    if family == "qwen3_vl":  # preprocessor_config.json: 16 px patches, shortest_edge 65536 px, mean/std 0.5
        from .qwen3_vl import TinyQwen3VLProcessor

        return TinyQwen3VLProcessor(min_pixels=65536, max_pixels=16777216, tokenizer=tok)
    from .qwen2_vl import TinyQwenVLProcessor  # Qwen2-VL / 2.5-VL: min_pixels 3136, max_pixels 12845056

    return TinyQwenVLProcessor(min_pixels=3136, max_pixels=12845056, tokenizer=tok)


def real_model(
    name: str,
    text_layers: int | None = 2,
    vision_layers: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """(model, processor): `name`'s real architecture with random weights (`real_config`), in eval mode, built
    directly on `device` in `dtype`, and `real_processor(name)`."""
    from transformers import (
        InternVLForConditionalGeneration,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    config = real_config(name, text_layers, vision_layers)
    cls = {
        "llava": LlavaForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "llava_onevision": LlavaOnevisionForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
    }[real_family(name)]
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    # one initialisation pass, not two (torch's default init in the constructors, then transformers' own):
    # construct with both switched off, then run transformers' `init_weights` once
    with torch.device(device), no_init_weights():
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.init_weights()
    if real_family(name) == "internvl":  # [CLS] and position embeddings are zeros at init: draw them
        embeddings = model.model.vision_tower.embeddings
        with torch.no_grad():
            embeddings.cls_token.normal_(0.0, 1.0)
            embeddings.position_embeddings.normal_(0.0, 0.5)
    return model.eval(), real_processor(name)


def real_inputs(name: str, processor, questions: list[str], images: list[list[Image.Image]] | None = None):
    """A left-padded batch of chat prompts for `name` (images[i]: the images of sample i), as its family's
    builder in `vtc.testing` makes them."""
    family = real_family(name)
    if family == "llava":
        from .llava import llava_inputs

        return llava_inputs(processor, questions, images)
    if family in ("llava_next", "llava_onevision"):
        from .llava_next import next_inputs

        return next_inputs(processor, questions, images)
    if family == "internvl":
        from .internvl import internvl_inputs

        return internvl_inputs(processor, questions, images)
    from .qwen2_vl import qwen_inputs

    return qwen_inputs(processor, questions, images=images)
