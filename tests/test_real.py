"""Every strategy on the real architectures (`vtc.testing.real_model`: published widths, vision towers, special
token ids and image processors, random weights, 2 decoder layers).

Per strategy: keep=1 gives the unpatched logits; generate() runs at the strategy's default keep and at 0.1, the
report counts the real number of visual tokens (576 for LLaVA-1.5 at 336 px, ...) and never keeps more than came
in; unpatch() gives exactly the unpatched logits again. A strategy whose probes a family cannot provide is
refused at patch() (the adapter matrix's `UNSUPPORTED`); EVS (`REFUSES_IMAGES`) refuses these
image prompts at their first forward, and DyCoke (`KEEPS_IMAGES`) keeps them whole.

Marked `slow` (`make test-real`). Its vision towers keep their first `VTC_REAL_VISION_LAYERS` blocks (8 by
default; `all` for the full towers, hours on 2 CPU cores): every width, token count and grid is the real one, and
8 blocks keep Qwen2.5-VL's real window/full-attention pattern (7 window blocks, then a full one) and Qwen3-VL's
first DeepStack layer (block 5); the full towers cost about three to four times as much for no other shape. The
CI slice, which runs by default, is Qwen2-VL-2B with its tower cut to 4 blocks on 56 px images (4 visual tokens).
"""

import os

import pytest
import torch

import vtc
from vtc.testing import make_image
from vtc.testing.real import REAL_NAMES, real_config, real_family, real_inputs, real_model, real_processor

from .test_matrix import KEEPS_IMAGES, REFUSES_IMAGES, UNSUPPORTED

STRATEGIES = vtc.list_strategies()
# 2 decoder layers leave no layer 2 to prune before: FastV and DART prune before layer 1, ToDRE runs stage 1 only,
# PyramidDrop has one stage (before layer 1), SparseVLM and MustDrop prune the output of layer 0
TWO_LAYER_OPTIONS = {
    "fastv": {"layer": 1},
    "dart": {"layer": 1},
    "todre": {"stage2": False},
    "pdrop": {"layers": [1]},
    "sparsevlm": {"layers": [0]},
    "mustdrop": {"layers": [0]},
}
# DyVTE's budget is not `keep`: without trained routers its fallback exits every visual token at L/2
NOT_IDENTITY_AT_KEEP_ONE = {"dyvte"}

# name -> (image side in px, placeholder tokens the real processor puts in the prompt, visual tokens the report
# counts: the placeholders less the anyres newline tokens, which vtc always keeps):
#   LLaVA-1.5: (336 / 14)^2 = 576; LLaVA-NeXT at 336 x 336: pinpoint 336 x 672, base 576 + the 24 x 48 grid
#   unpadded to 24 x 24 (576) + a newline per row (24) = 1176 placeholders, 1152 visual; OneVision at 384 x 384:
#   base 729 + one 27 x 27 crop (729) + 27 newlines = 1485, 1458 visual; Qwen2-VL / 2.5-VL at 224 px:
#   (224 / 14)^2 / 4 = 64; Qwen3-VL: at least 65536 px, (256 / 16)^2 / 4 = 64; InternVL3 at 448 px: one tile,
#   (448 / 14 / 2)^2 = 256
CASES = {  # cheapest first
    "qwen3-vl-2b": (256, 64, 64),
    "qwen2-vl-2b": (224, 64, 64),
    "qwen2.5-vl-3b": (224, 64, 64),
    "internvl3-1b": (448, 256, 256),
    "llava-onevision-qwen2-0.5b": (384, 1485, 1458),
    "llava-1.5-7b": (336, 576, 576),
    "llava-v1.6-mistral-7b": (336, 1176, 1152),
}
# the CI run of this file: Qwen2-VL-2B's widths, its tower cut to 4 blocks, 56 px images: (56 / 14)^2 / 4 = 4 tokens
CI_SLICE = ("qwen2-vl-2b", 56, 4, 4, 4)


_VISION_LAYERS = os.environ.get("VTC_REAL_VISION_LAYERS", "8")
VISION_LAYERS = None if _VISION_LAYERS == "all" else int(_VISION_LAYERS)


def _params():
    params = [
        pytest.param((name, *case, VISION_LAYERS), marks=pytest.mark.slow, id=name) for name, case in CASES.items()
    ]
    return [*params, pytest.param(CI_SLICE, id=f"{CI_SLICE[0]}-{CI_SLICE[1]}px-{CI_SLICE[-1]}-vision-layers")]


@pytest.fixture(scope="module", params=_params())
def real(request):
    name, size, placeholders, tokens, vision_layers = request.param
    model, processor = real_model(name, text_layers=2, vision_layers=vision_layers)
    inputs = dict(real_inputs(name, processor, ["What is in the image?"], [[make_image(0, size=size)]]))
    with torch.no_grad():
        reference = model(**inputs).logits
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == placeholders
    yield name, model, processor, inputs, tokens, reference
    del model


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_on_real_architecture(real, strategy):
    name, model, processor, inputs, tokens, reference = real
    family = real_family(name)
    options = {"processor": processor, **TWO_LAYER_OPTIONS.get(strategy, {})}
    missing = UNSUPPORTED.get(family, {}).get(strategy)
    if missing:
        with pytest.raises(ValueError, match=missing.replace("[", r"\[").replace("]", r"\]")):
            vtc.patch(model, strategy, keep=0.25, **options)
        assert "forward" not in vars(model.model.language_model)
        return
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        if strategy not in NOT_IDENTITY_AT_KEEP_ONE:
            with vtc.patched(model, strategy, keep=1.0, **options):
                logits = model(**inputs).logits
            assert logits.shape == reference.shape
            assert (logits - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())
        for keep in (None, 0.1):
            if strategy in REFUSES_IMAGES:  # these prompts hold an image: refused at the first forward
                refused = pytest.raises(ValueError, match=REFUSES_IMAGES[strategy])
                with vtc.patched(model, strategy, keep=keep, **options), refused:
                    model.generate(**inputs, max_new_tokens=2, do_sample=False)
                continue
            with vtc.patched(model, strategy, keep=keep, **options) as handle:
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                (sample,) = handle.report().samples
            assert out.shape == (1, prompt + 2)
            assert sample.visual_in == tokens
            assert max(sample.visual_per_layer) <= sample.visual_after_pre_llm <= sample.visual_in
            if keep == 0.1 and tokens > 10 and strategy != "none" and strategy not in KEEPS_IMAGES:  # images kept whole
                assert sample.visual_per_layer[-1] < sample.visual_in
        assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_config_cuts_depth_and_tokenizer_matches_config_ids(name):
    full, cut = real_config(name, text_layers=None), real_config(name, text_layers=1, vision_layers=1)
    assert cut.text_config.num_hidden_layers == 1 < full.text_config.num_hidden_layers
    assert cut.text_config.hidden_size == full.text_config.hidden_size
    vision = cut.vision_config
    assert getattr(vision, "depth", getattr(vision, "num_hidden_layers", None)) == 1
    if hasattr(vision, "fullatt_block_indexes"):  # Qwen2.5-VL: the only block left attends in full
        assert vision.fullatt_block_indexes == [0]
    tok = real_processor(name).tokenizer
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(full.image_token_id)) == full.image_token_id
    assert tok.convert_ids_to_tokens(full.image_token_id) in ("<image>", "<|image_pad|>", "<IMG_CONTEXT>")
    with pytest.raises(ValueError, match=r"text_layers must be in \[1, "):
        real_config(name, text_layers=10_000)


def test_real_config_names_the_known_architectures():
    with pytest.raises(ValueError, match="known: llava-1.5-7b"):
        real_config("llava-13b")
