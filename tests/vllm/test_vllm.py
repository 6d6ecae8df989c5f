"""vtc inside vLLM, against transformers on the same saved tiny LLaVA-1.5 (fp32, greedy).

Runs only where vLLM imports (`make vllm-test`, the second step of .ci/run, through .venv-vllm); the main suite
skips it. Few engines, many requests each: an engine takes minutes to start on a CPU.

References (transformers, same weights, same processor files):
- the plain engine equals the unpatched HF model;
- a vtc engine equals the HF model run on the compacted sequence: the image span replaced by the kept (or merged)
  features that vtc's strategy selects from HF's own vision tower and probes (kept indices checked against
  `vtc.patch`), at consecutive positions, as vLLM numbers a shortened prompt (see vtc/integrations/vllm/llava.py).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import vtc  # noqa: E402
from vtc.integrations.vllm import make_strategy, overrides  # noqa: E402
from vtc.integrations.vllm.checkpoint import save_for_vllm  # noqa: E402
from vtc.integrations.vllm.select import select_images  # noqa: E402
from vtc.probes import vit_attention_received, vit_cls_attention, vit_keys  # noqa: E402
from vtc.testing import make_image, tiny_llava, tiny_llava_processor  # noqa: E402

HF_PROBES = {"cls": vit_cls_attention, "received": vit_attention_received, "keys": vit_keys}
QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word.", "Where is it?"]
MAX_TOKENS = 8
STRATEGIES = os.environ.get("VTC_VLLM_STRATEGIES", "vtc_cls").split(",")  # `make vllm-test-all`: every one


def prompt(question: str, n_images: int = 1) -> str:
    return "USER: " + "<image>\n" * n_images + question + " ASSISTANT:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LLaVA-1.5 (Llama decoder, head_dim 64: a size vLLM's CPU attention supports), saved once."""
    path = tmp_path_factory.mktemp("tiny_llava_vllm")
    return str(save_for_vllm(tiny_llava("llama", seed=0, text_hidden=256), tiny_llava_processor(), path))


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: every step takes the argmax
    return model, AutoProcessor.from_pretrained(model_dir)


def make_engine(model_dir, **kwargs):
    return vllm.LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2},
        **kwargs,
    )


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy():
    return vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def hf_inputs(hf, question, images):
    model, processor = hf
    return processor(images=images, text=[prompt(question, len(images))], return_tensors="pt")


def hf_tokens(model, **inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, -MAX_TOKENS:].tolist()


def hf_compact(hf, question, images, settings, keep=None):
    """The unpatched HF model on the compacted sequence: (prompt length, greedy tokens, kept per image, HF's
    visual features (I, N, D), the kept or merged features per image)."""
    model, _ = hf
    inputs = hf_inputs(hf, question, images)
    strategy = make_strategy({**settings, "keep": keep if keep is not None else settings.get("keep")})
    vision = model.config.vision_config
    n_layers, layer = vision.num_hidden_layers, model.config.vision_feature_layer
    probes: dict = {}
    hooks = []
    tower = model.model.vision_tower
    tower_layers = getattr(tower, "vision_model", tower).encoder.layers
    for kind, layer_ids in strategy.vision_probes(n_layers, n_layers + layer).items():
        for i in layer_ids:
            def hook(module, args, kwargs, kind=kind, i=i):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                probes.setdefault(kind, {})[i] = HF_PROBES[kind](module, hidden)[..., 1:]

            hooks.append(tower_layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    for h in hooks:
        h.remove()
    n_tokens = features.shape[1]
    budget = strategy.stage_budget(n_tokens, n_tokens, "pre_llm")
    side = vision.image_size // vision.patch_size
    kept = select_images(strategy, features, (side, side), [budget] * len(images), probes)
    ids = inputs["input_ids"][0]
    is_image = ids == model.config.image_token_id
    embeds = model.get_input_embeddings()(ids[None])[0]
    pieces, start = [], 0
    image_starts = torch.nonzero(is_image).flatten().view(len(images), n_tokens)[:, 0].tolist()  # may be adjacent
    for image, first in enumerate(image_starts):
        pieces += [embeds[start:first], kept[image]]
        start = first + n_tokens
    pieces.append(embeds[start:])
    compact = torch.cat(pieces)[None]
    tokens = hf_tokens(model, inputs_embeds=compact, attention_mask=torch.ones(compact.shape[:2], dtype=torch.long))
    return compact.shape[1], tokens, budget, features, kept


def vtc_patch_kept(hf, question, images, settings, keep=None) -> list[torch.Tensor]:
    """Per image, the indices of the visual tokens `vtc.patch` keeps on the same HF model and input."""
    model, _ = hf
    options = {k: v for k, v in settings.items() if k not in ("strategy", "keep")}
    keep = keep if keep is not None else make_strategy(settings).keep
    with vtc.patched(model, settings["strategy"], keep=keep, **options) as handle:
        with torch.no_grad():
            model(**hf_inputs(hf, question, images))
        kept = handle.last_kept("pre_llm")[0]
    n_tokens = 36
    return [kept[(kept >= i * n_tokens) & (kept < (i + 1) * n_tokens)] - i * n_tokens for i in range(len(images))]


def test_plain_engine_equals_transformers(model_dir, hf):
    """Step 1: vLLM (no vtc settings: the plug-in passes through) equals transformers on the same saved model."""
    llm = make_engine(model_dir)
    try:
        requests = [
            {"prompt": prompt(q), "multi_modal_data": {"image": make_image(i)}} for i, q in enumerate(QUESTIONS)
        ]
        outs = llm.generate(requests, greedy())
    finally:
        close(llm)
    for i, (question, out) in enumerate(zip(QUESTIONS, outs)):
        inputs = hf_inputs(hf, question, [make_image(i)])
        assert len(out.prompt_token_ids) == inputs["input_ids"].shape[1]
        assert list(out.outputs[0].token_ids) == hf_tokens(hf[0], **inputs)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vtc_engine_equals_transformers(model_dir, hf, strategy):
    """A vtc engine: prompts shrink by exactly the dropped tokens; greedy tokens equal HF on the compacted
    sequence; per-request keep; mixed batches with one and two images; prefix caching and chunked prefill on."""
    settings = overrides(strategy, keep=0.25)["vtc"]
    llm = make_engine(
        model_dir,
        hf_overrides={"vtc": settings},
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=48,  # shorter than the prompts: prefills run in chunks
        block_size=16,  # prefix caching keeps full blocks only: blocks shorter than the prompts
    )
    cases = [  # (question, image seeds, per-request keep)
        (QUESTIONS[0], [0], None),
        (QUESTIONS[1], [1], 0.1),
        (QUESTIONS[2], [2, 3], None),
        (QUESTIONS[0], [4], 1.0),
        (QUESTIONS[1], [0], 5),
    ]
    requests = []
    for question, seeds, keep in cases:
        images = [make_image(s) for s in seeds]
        request = {"prompt": prompt(question, len(seeds)), "multi_modal_data": {"image": images}}
        if keep is not None:
            request["mm_processor_kwargs"] = {"vtc_keep": keep}
        requests.append(request)
    try:
        first = llm.generate(requests, greedy())
        again = llm.generate(requests, greedy())  # the prefixes are cached now
    finally:
        close(llm)
    for (question, seeds, keep), out, out2 in zip(cases, first, again):
        images = [make_image(s) for s in seeds]
        full = hf_inputs(hf, question, images)["input_ids"].shape[1]
        length, tokens, budget, features, kept = hf_compact(hf, question, images, settings, keep)
        n_tokens = 36  # 84 px / 14 px patches: a 6 x 6 grid per image
        assert len(out.prompt_token_ids) == length == full - len(images) * (n_tokens - budget)
        assert list(out.outputs[0].token_ids) == tokens, (question, seeds, keep)
        assert list(out2.outputs[0].token_ids) == tokens
        assert out2.num_cached_tokens > 0
        merges = strategy == "downsample" and keep != 1.0  # kept tokens are pooled cells, not a subset
        if len(images) == 1 and not merges:  # the same tokens as vtc.patch keeps (one image: same seed for random)
            for image, kept_by_patch in enumerate(vtc_patch_kept(hf, question, images, settings, keep)):
                assert torch.equal(kept[image], features[image, kept_by_patch])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_image_url(model_dir):
    """The OpenAI-compatible server on loopback with the README's --hf-overrides answers an image_url request,
    billing the shorter prompt; a plain request to the same model would bill the full image."""
    import base64
    import io

    port = _free_port()
    keep = 0.25
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
        "--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
        "--hf-overrides", json.dumps(overrides("vtc_cls", keep=keep)),
    ]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, "the server exited while starting"
                time.sleep(5)
        buffer = io.BytesIO()
        make_image(0).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

        def ask(extra: dict) -> dict:
            body = {
                "model": model_dir,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[0]}]}],
                "max_tokens": 4, "temperature": 0.0, **extra,
            }  # fmt: skip
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            return json.load(urllib.request.urlopen(request, timeout=120))

        short = ask({})
        full = ask({"mm_processor_kwargs": {"vtc_keep": 1.0}})
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert short["choices"][0]["message"]["content"] is not None
    dropped = 36 - round(36 * keep)
    assert full["usage"]["prompt_tokens"] - short["usage"]["prompt_tokens"] == dropped
