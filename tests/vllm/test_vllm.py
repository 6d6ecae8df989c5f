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
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import vtc  # noqa: E402
from vtc.integrations.vllm import SERVED, make_strategy, overrides, request_settings, served_budget  # noqa: E402
from vtc.integrations.vllm.checkpoint import save_for_vllm  # noqa: E402
from vtc.integrations.vllm.select import select_images  # noqa: E402
from vtc.probes import vit_attention_received, vit_cls_attention, vit_keys  # noqa: E402
from vtc.testing import make_image, tiny_llava, tiny_llava_processor  # noqa: E402

HF_PROBES = {"cls": vit_cls_attention, "received": vit_attention_received, "keys": vit_keys}
QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word.", "Where is it?"]
MAX_TOKENS = 8


SYSTEM = "A chat between a curious user and an assistant. The assistant gives helpful answers to the questions."


def prompt(question: str, n_images: int = 1) -> str:
    """LLaVA-1.5's prompt format, with a system line long enough to fill the first prefix-cache blocks."""
    return SYSTEM + " USER: " + "<image>\n" * n_images + question + " ASSISTANT:"


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


def hf_compact(hf, question, images, settings):
    """The unpatched HF model on the compacted sequence: (prompt length, greedy tokens, kept per image, HF's
    visual features (I, N, D), the kept or merged features per image). `settings`: the request's vtc settings."""
    model, _ = hf
    inputs = hf_inputs(hf, question, images)
    vision = model.config.vision_config
    n_layers, feature_layer = vision.num_hidden_layers, vision.num_hidden_layers + model.config.vision_feature_layer
    probes: dict = {}
    hooks = []
    tower = model.model.vision_tower
    tower_layers = getattr(tower, "vision_model", tower).encoder.layers
    for kind, layer_ids in make_strategy(settings).vision_probes(n_layers, feature_layer).items():
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
    side = vision.image_size // vision.patch_size
    kept = select_images([settings] * len(images), features, (side, side), probes, (n_layers, feature_layer))
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
    return compact.shape[1], tokens, features, kept


def vtc_patch_kept(hf, question, images, settings) -> list[torch.Tensor]:
    """Per image, the indices of the visual tokens `vtc.patch` keeps on the same HF model and input."""
    model, _ = hf
    options = {k: v for k, v in settings.items() if k not in ("strategy", "keep")}
    keep = make_strategy(settings).keep
    with vtc.patched(model, settings["strategy"], keep=keep, **options) as handle:
        with torch.no_grad():
            model(**hf_inputs(hf, question, images))
        kept = handle.last_kept("pre_llm")[0]
    n_tokens = 36
    return [kept[(kept >= i * n_tokens) & (kept < (i + 1) * n_tokens)] - i * n_tokens for i in range(len(images))]


def test_vtc_key_on_an_unserved_architecture_fails_loud(tmp_path):
    """hf_overrides {"vtc": ...} on an architecture the plug-in does not register (a text-only Llama here) fails
    when vLLM resolves the architecture, naming the served ones; without the key the same model config builds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm.engine.arg_utils import EngineArgs

    from vtc.integrations.vllm import MODELS

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert EngineArgs(model=str(tmp_path)).create_model_config().architecture == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="does not serve architecture 'LlamaForCausalLM'") as error:
        EngineArgs(model=str(tmp_path), hf_overrides=overrides("vtc_cls", keep=0.25)).create_model_config()
    assert all(arch in str(error.value) for arch in MODELS)


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


def vtc_cases() -> list[tuple[str, list[int], dict]]:
    """(question, image seeds, mm_processor_kwargs): every served strategy on one image at the engine's keep
    (vtc_cls) or its paper default, then per-request keeps (fraction, all, token count) and a two-image prompt;
    `make vllm-test-all` (VTC_VLLM_ALL=1) runs the per-request keeps and two images for every strategy."""
    cases = [
        (QUESTIONS[i % 3], [i], {} if name == "vtc_cls" else {"vtc_strategy": name}) for i, name in enumerate(SERVED)
    ]
    for name in SERVED if os.environ.get("VTC_VLLM_ALL") else ["vtc_cls"]:
        request = {} if name == "vtc_cls" else {"vtc_strategy": name}
        cases += [
            (QUESTIONS[1], [10], {**request, "vtc_keep": 0.1}),
            (QUESTIONS[2], [11, 12], request),
            (QUESTIONS[0], [13], {**request, "vtc_keep": 1.0}),
            (QUESTIONS[1], [14], {**request, "vtc_keep": 5}),
        ]
    return cases


def test_vtc_engine_equals_transformers(model_dir, hf):
    """One vtc engine (vtc_cls, keep 0.25), every served strategy through per-request mm_processor_kwargs: prompts
    shrink by exactly the dropped tokens; greedy tokens equal HF on the compacted sequence and the kept tokens are
    those vtc.patch keeps; mixed batches with one and two images; prefix caching and chunked prefill on."""
    engine_settings = overrides("vtc_cls", keep=0.25)["vtc"]
    cases = vtc_cases()
    requests = []
    for question, seeds, kwargs in cases:
        images = [make_image(s) for s in seeds]
        request = {"prompt": prompt(question, len(seeds)), "multi_modal_data": {"image": images}}
        if kwargs:
            request["mm_processor_kwargs"] = kwargs
        requests.append(request)
    llm = make_engine(
        model_dir,
        hf_overrides={"vtc": engine_settings},
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=48,  # shorter than the longer prompts: their prefills run in chunks
        block_size=32,  # the CPU backend's smallest; prefix caching keeps full blocks only
    )
    try:
        first = llm.generate(requests, greedy())
        again = llm.generate(requests, greedy())  # the prefixes are cached now
    finally:
        close(llm)
    for (question, seeds, kwargs), out, out2 in zip(cases, first, again):
        settings = request_settings(engine_settings, kwargs)
        images = [make_image(s) for s in seeds]
        full = hf_inputs(hf, question, images)["input_ids"].shape[1]
        length, tokens, features, kept = hf_compact(hf, question, images, settings)
        n_tokens = 36  # 84 px / 14 px patches: a 6 x 6 grid per image
        budget = served_budget(make_strategy(settings), n_tokens)
        assert len(out.prompt_token_ids) == length == full - len(images) * (n_tokens - budget), (settings, seeds)
        assert list(out.outputs[0].token_ids) == tokens, (settings, seeds)
        assert list(out2.outputs[0].token_ids) == tokens
        assert out2.num_cached_tokens >= 32 * ((len(out.prompt_token_ids) - 1) // 32) > 0  # full blocks reused
        merges = settings["strategy"] in ("downsample", "visionzip", "tome") and budget < n_tokens
        if len(images) == 1 and not merges:  # the same tokens as vtc.patch keeps (one image: same seed for random)
            for image, kept_by_patch in enumerate(vtc_patch_kept(hf, question, images, settings)):
                assert torch.equal(kept[image], features[image, kept_by_patch]), settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_image_url(model_dir, hf):
    """The OpenAI-compatible server on loopback, started with the README's --hf-overrides, answers an image_url
    chat request and bills the shorter prompt; a request's own keep (--trust-request-mm-kwargs) bills the full one."""
    import base64
    import io

    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
        "--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
        "--hf-overrides", json.dumps(overrides("vtc_cls", keep=0.25)), "--trust-request-mm-kwargs",
    ]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, "the server exited while starting"
                assert time.time() < deadline, "the server did not start in 15 minutes"
                time.sleep(5)
        buffer = io.BytesIO()
        make_image(0).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[0]}]

        def ask(extra: dict) -> dict:
            body = {"model": model_dir, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                    "temperature": 0.0, **extra}  # fmt: skip
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            return json.load(urllib.request.urlopen(request, timeout=300))

        short = ask({})
        full = ask({"mm_processor_kwargs": {"vtc_keep": 1.0}})
    finally:
        server.terminate()
        server.wait(timeout=120)
    _, processor = hf
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}],
        add_generation_prompt=True,
    )
    unpatched = processor(images=[make_image(0)], text=[text], return_tensors="pt")["input_ids"].shape[1]
    assert short["choices"][0]["message"]["content"]
    assert short["usage"]["prompt_tokens"] == unpatched - (36 - 9)  # keep 0.25: 9 of 36 tokens
    assert full["usage"]["prompt_tokens"] == unpatched


def readme_blocks() -> list[str]:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Serving with vLLM", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize(
    "block", range(len(readme_blocks()) if os.environ.get("VTC_VLLM_ALL") else 1), ids=lambda i: f"block{i}"
)
def test_readme_serving_example(block, tmp_path):
    """The README's "Serving with vLLM" Python examples run as written and print the prompt lengths their comment
    states (the CI slice runs the first, LLaVA's; `make vllm-test-all` every one)."""
    code = readme_blocks()[block]
    (expected,) = re.findall(r"print\(.*\)  # (\[[0-9, ]+\])", code)
    script = tmp_path / "serve_tiny.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout.splitlines(), done.stdout[-3000:]  # vLLM logs to stdout too
