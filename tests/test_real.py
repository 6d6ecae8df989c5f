"""Every strategy on the real architectures (`vtc.testing.real_model`: published widths, vision towers, special
token ids and image processors, random weights, 2 decoder layers).

Per strategy: keep=1 gives the unpatched logits; generate() runs at the strategy's default keep and at 0.1, the
report counts the real number of visual tokens (576 for LLaVA-1.5 at 336 px, ...) and never keeps more than came
in; unpatch() gives exactly the unpatched logits again. A strategy whose probes a family cannot provide is
refused at patch() (the adapter matrix's `UNSUPPORTED`).

Marked `slow` (`make test-real`: hours on 2 busy CPU cores, see the README); the CI slice, which runs by
default, is Qwen2-VL-2B with its tower cut to 4 blocks on 56 px images (4 visual tokens).
"""

import pytest
import torch

import vtc
from vtc.testing import make_image
from vtc.testing.real import real_family, real_inputs, real_model

from .test_matrix import UNSUPPORTED

STRATEGIES = vtc.list_strategies()
# 2 decoder layers leave no layer 2 to prune before: FastV and DART prune before layer 1, ToDRE runs stage 1 only
TWO_LAYER_OPTIONS = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "todre": {"stage2": False}}
# DyVTE's budget is not `keep`: without trained routers its fallback exits every visual token at L/2
NOT_IDENTITY_AT_KEEP_ONE = {"dyvte"}

# name -> (image side in px, visual tokens per image the real processor makes and the model gets):
#   LLaVA-1.5: (336 / 14)^2 = 576; LLaVA-NeXT at 336 x 336: pinpoint 336 x 672, base 576 + the 24 x 48 grid
#   unpadded to 24 x 24 with a newline per row (600) = 1176; OneVision at 384 x 384: base 729 + one 27 x 27 crop
#   with newlines (756) = 1485; Qwen2-VL / 2.5-VL at 224 px: (224 / 14)^2 / 4 = 64; Qwen3-VL: at least 65536 px,
#   (256 / 16)^2 / 4 = 64; InternVL3 at 448 px: one tile, (448 / 14 / 2)^2 = 256
CASES = {
    "llava-1.5-7b": (336, 576),
    "llava-v1.6-mistral-7b": (336, 1176),
    "llava-onevision-qwen2-0.5b": (384, 1485),
    "qwen2-vl-2b": (224, 64),
    "qwen2.5-vl-3b": (224, 64),
    "qwen3-vl-2b": (256, 64),
    "internvl3-1b": (448, 256),
}
# the CI run of this file: Qwen2-VL-2B's widths, its tower cut to 4 blocks, 56 px images: (56 / 14)^2 / 4 = 4 tokens
CI_SLICE = ("qwen2-vl-2b", 56, 4, 4)


def _params():
    params = [pytest.param((name, *case, None), marks=pytest.mark.slow, id=name) for name, case in CASES.items()]
    return [*params, pytest.param(CI_SLICE, id=f"{CI_SLICE[0]}-{CI_SLICE[1]}px-{CI_SLICE[3]}-vision-layers")]


@pytest.fixture(scope="module", params=_params())
def real(request):
    name, size, tokens, vision_layers = request.param
    model, processor = real_model(name, text_layers=2, vision_layers=vision_layers)
    inputs = dict(real_inputs(name, processor, ["What is in the image?"], [[make_image(0, size=size)]]))
    with torch.no_grad():
        reference = model(**inputs).logits
    yield name, model, processor, inputs, tokens, reference
    del model


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_on_real_architecture(real, strategy):
    name, model, processor, inputs, tokens, reference = real
    family = real_family(name)
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == tokens
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
            with vtc.patched(model, strategy, keep=keep, **options) as handle:
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                (sample,) = handle.report().samples
            assert out.shape == (1, prompt + 2)
            assert sample.visual_in == tokens
            assert max(sample.visual_per_layer) <= sample.visual_after_pre_llm <= sample.visual_in
            if keep == 0.1 and tokens > 10:
                assert sample.visual_per_layer[-1] < sample.visual_in
        assert torch.equal(model(**inputs).logits, reference)
