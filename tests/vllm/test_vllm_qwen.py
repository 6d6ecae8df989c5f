"""vtc inside vLLM on Qwen2.5-VL / Qwen2-VL (M-RoPE), against transformers with vtc.patch on the same saved tiny
model (fp32, greedy). Kept tokens keep their original (t, h, w) positions in both hosts, so vLLM's greedy tokens
equal those of `vtc.patch` itself (not of a compacted re-run, as for LLaVA's 1-D positions).

Runs only where vLLM imports (`make vllm-test`); few engines, many requests each. The CI slice serves Qwen2.5-VL;
`make vllm-test-all` (VTC_VLLM_ALL=1) adds every strategy with per-request keeps and Qwen2-VL.
"""

from __future__ import annotations

import gc
import os

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import vtc  # noqa: E402
from vtc.integrations.vllm import SERVED, make_strategy, overrides, request_settings, served_budget  # noqa: E402
from vtc.testing import make_image  # noqa: E402

ALL = bool(os.environ.get("VTC_VLLM_ALL"))
QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word.", "Where is it?"]
SYSTEM = "You are a helpful assistant. Answer the questions about the pictures briefly and precisely."
MAX_TOKENS = 8
MAX_PIXELS = 28 * 28 * 36  # up to 36 merged tokens per image


def image(seed: int):
    """Square (6 x 6 tokens) for even seeds, wide (4 x 6 tokens: h != w) for odd ones."""
    picture = make_image(seed, size=168)
    return picture if seed % 2 == 0 else picture.resize((168, 112))


def prompt(question: str, n_images: int = 1) -> str:
    """Qwen's chat format, with a system turn long enough to fill the first prefix-cache blocks."""
    images = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{images}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def save_tiny(family: str, path) -> str:
    """A tiny random Qwen2-VL / Qwen2.5-VL (LLM head_dim 64: a size vLLM's CPU attention supports) and its real
    processor, saved for both hosts."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from vtc.integrations.vllm.checkpoint import save_qwen_vl_processor
    from vtc.testing.qwen2_vl import tiny_qwen_tokenizer, tiny_qwen_vl_config

    config = tiny_qwen_vl_config(family, text_hidden=256)
    torch.manual_seed(0)
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    cls._from_config(config, attn_implementation="sdpa").eval().save_pretrained(path)
    save_qwen_vl_processor(path, family, tiny_qwen_tokenizer(), min_pixels=28 * 28, max_pixels=MAX_PIXELS)
    return str(path)


def load_hf(path: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: every step takes the argmax
    return model, AutoProcessor.from_pretrained(path)


def hf_tokens(hf, question, images, settings=None) -> tuple[int, list[int], int]:
    """(unshortened prompt length, greedy tokens, visual tokens per image sum) of transformers, with vtc.patch's
    `settings` (or unpatched)."""
    model, processor = hf
    inputs = processor(images=images, text=[prompt(question, len(images))], return_tensors="pt")
    tokens = []
    with torch.no_grad():
        if settings is None:
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        else:
            options = {k: v for k, v in settings.items() if k not in ("strategy", "keep")}
            with vtc.patched(model, settings["strategy"], keep=make_strategy(settings).keep, **options):
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    tokens = out[0, -MAX_TOKENS:].tolist()
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    return inputs["input_ids"].shape[1], tokens, counts


def cases() -> list[tuple[str, list[int], dict]]:
    """(question, image seeds, mm_processor_kwargs): the CI slice has vtc_cls at the engine's keep on a square and a
    wide image, keep 1.0 (must equal the unpatched model), a token-count keep, two images in one prompt, and the
    probe-reading strategies fopru and visionzip; VTC_VLLM_ALL adds every served strategy at its default and 0.1."""
    out = [
        (QUESTIONS[0], [0], {}),
        (QUESTIONS[1], [1], {}),
        (QUESTIONS[2], [2], {"vtc_keep": 1.0}),
        (QUESTIONS[0], [3], {"vtc_keep": 5}),
        (QUESTIONS[1], [4, 5], {}),
        (QUESTIONS[2], [6], {"vtc_strategy": "fopru"}),
        (QUESTIONS[0], [7], {"vtc_strategy": "visionzip"}),
    ]
    if ALL:
        for i, name in enumerate(n for n in SERVED if n != "hired"):  # HiRED needs a real [CLS]: refused
            out += [(QUESTIONS[i % 3], [10 + i], {"vtc_strategy": name}),
                    (QUESTIONS[(i + 1) % 3], [20 + i], {"vtc_strategy": name, "vtc_keep": 0.1})]  # fmt: skip
    return out


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


FAMILIES = ["qwen2_5_vl", "qwen2_vl"] if ALL else ["qwen2_5_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_qwen_vtc_engine_equals_vtc_patch(family, tmp_path):
    """One vtc engine (vtc_cls, keep 0.25; prefix caching and chunked prefill on), requests with their own strategy
    and keep: each prompt shrinks by exactly the dropped tokens, and vLLM's greedy tokens equal transformers' with
    vtc.patch (same strategy and keep), on the first run and on the rerun from the prefix cache; keep 1.0 equals
    the unpatched model."""
    path = save_tiny(family, tmp_path / family)
    hf = load_hf(path)
    engine = overrides("vtc_cls", keep=0.25)["vtc"]
    todo = cases()
    requests = []
    for question, seeds, kwargs in todo:
        request = {"prompt": prompt(question, len(seeds)), "multi_modal_data": {"image": [image(s) for s in seeds]}}
        if kwargs:
            request["mm_processor_kwargs"] = kwargs
        requests.append(request)
    llm = vllm.LLM(
        model=path,
        dtype="float32",
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2, "video": 0},
        hf_overrides={"vtc": engine},
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=48,  # shorter than the prompts: their prefills run in chunks, some inside an image
        block_size=32,  # the CPU backend's smallest; prefix caching keeps full blocks only
    )
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        first = llm.generate(requests, greedy)
        again = llm.generate(requests, greedy)  # the prefixes are cached now
        hired = {**requests[0], "mm_processor_kwargs": {"vtc_strategy": "hired"}}
        with pytest.raises(ValueError, match="needs the vision tower's own \\[CLS\\] token"):
            llm.generate([hired], greedy)  # refused as by vtc.patch on Qwen-VL
    finally:
        close(llm)
    for (question, seeds, kwargs), out, out2 in zip(todo, first, again):
        settings = request_settings(engine, kwargs)
        images = [image(s) for s in seeds]
        full, tokens, counts = hf_tokens(hf, question, images, settings)
        dropped = sum(n - served_budget(make_strategy(settings), n) for n in counts)
        assert len(out.prompt_token_ids) == full - dropped, (settings, seeds)
        assert list(out.outputs[0].token_ids) == tokens, (settings, seeds)
        assert list(out2.outputs[0].token_ids) == tokens, (settings, seeds)
        assert out2.num_cached_tokens >= 32 * ((len(out.prompt_token_ids) - 1) // 32) > 0  # full blocks reused
        if kwargs.get("vtc_keep") == 1.0:
            assert tokens == hf_tokens(hf, question, images)[1]  # keep 1.0: vtc.patch equals the unpatched model
