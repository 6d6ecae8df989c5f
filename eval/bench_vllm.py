"""vtc inside vLLM: requests/s and time to first token, a vtc engine vs the unpatched engine, same settings.

Two engines in one process, with identical engine arguments (random weights: `load_format="dummy"`, no download):
the unpatched one, and one with `hf_overrides=vtc.integrations.vllm.overrides(strategy)` whose keep is set per
request (`mm_processor_kwargs={"vtc_keep": k}`), so every keep runs on the same engine. For each setting, in
`--rounds` rounds that interleave the settings (so drifts in machine load hit them alike), medians of:
- requests/s: `--requests` prompts with distinct images submitted at once, `--max-tokens` greedy tokens each;
- TTFT: the wall time of one request with max_tokens=1 (`--ttft-runs` per round, distinct images, prefix caching
  off, so each run encodes and prefills its image).
Compare the ratios (vtc / unpatched) of one run. On CPU, VLLM_CPU_KVCACHE_SPACE defaults to 2 (GiB) here.

    python eval/bench_vllm.py                        # CPU: a mid-size LLaVA-1.5 shape (576 visual tokens)
    python eval/bench_vllm.py --arch llava-1.5-7b    # GPU: LLaVA-1.5-7B's architecture, random weights
    python eval/bench_vllm.py --arch qwen2.5-vl-7b   # GPU: Qwen2.5-VL-7B's (vtc.testing.real_config), 672 px images
    python eval/bench_vllm.py --arch qwen-cpu-mid    # CPU: a mid-size Qwen2.5-VL shape, 576 visual tokens
    python eval/bench_vllm.py --arch tiny --requests 4 --rounds 1     # smoke run

Run it with the vLLM venv (`make vllm-setup`): `.venv-vllm/bin/python eval/bench_vllm.py`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ARCHS = {
    # name: (tiny_llava_config kwargs, vision tower kwargs, engine dtype)
    "tiny": dict(image_size=84, text_hidden=256),
    "cpu-mid": dict(image_size=336, vision_layers=4, vision_hidden=256, text_layers=8, text_hidden=512),
    "llava-1.5-7b": "llava-1.5-7b",
    # Qwen2.5-VL (M-RoPE): 672 px images give 24 x 24 = 576 visual tokens, as LLaVA-1.5's 336 px
    "qwen-cpu-mid": dict(vision_layers=4, vision_hidden=256, text_layers=8, text_hidden=512),
    "qwen2.5-vl-7b": "qwen2.5-vl-7b",
}
PROMPTS = {
    "llava": "USER: <image>\nWhat is in the image? ASSISTANT:",
    "qwen": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
    "<|im_start|>assistant\n",
}


def llava_15_7b_config():
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + Llama-2-7B, llava-hf/llava-1.5-7b-hf's config.json)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vtc.testing import IMAGE_TOKEN, tiny_tokenizer

    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tiny_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
    )  # fmt: skip


def write_model(arch: str, path: Path) -> tuple[int, str]:
    """config.json and processor files of `arch` in `path` (weights: vLLM's dummy loader). Returns the image side
    and the prompt family ("llava" or "qwen")."""
    if arch.startswith("qwen"):
        return write_qwen(arch, path), "qwen"
    from vtc.testing import tiny_llava_config, tiny_llava_processor

    if arch == "llava-1.5-7b":
        config = llava_15_7b_config()
    else:
        config = tiny_llava_config("llama", **ARCHS[arch])
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(path)
    size = config.vision_config.image_size
    tiny_llava_processor(image_size=size, patch_size=config.vision_config.patch_size).save_pretrained(path)
    return size, "llava"


def write_qwen(arch: str, path: Path) -> int:
    """A Qwen2.5-VL config (Qwen2.5-VL-7B's from vtc.testing.real_config at full depth, or a mid-size one for the CPU)
    and a real Qwen2.5-VL processor; 672 px square images."""
    from vtc.integrations.vllm.checkpoint import save_qwen_vl_processor
    from vtc.testing.qwen2_vl import tiny_qwen_tokenizer, tiny_qwen_vl_config
    from vtc.testing.real import real_config, real_image_size, real_tokenizer

    if arch == "qwen2.5-vl-7b":
        config, tokenizer, pixels = real_config(arch, text_layers=None), real_tokenizer(arch), (3136, 12845056)
        size = real_image_size(arch)
    else:
        config = tiny_qwen_vl_config("qwen2_5_vl", **ARCHS[arch])  # head_dim 128, as Qwen2.5-VL-7B
        tokenizer, size = tiny_qwen_tokenizer(), 672
        pixels = (28 * 28, size * size)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(path)
    save_qwen_vl_processor(path, "qwen2_5_vl", tokenizer, *pixels)
    return size


def engine(path: Path, dtype: str, hf_overrides: dict | None, family: str):
    from vllm import LLM

    limits = {"image": 1, "video": 0} if family == "qwen" else {"image": 1}  # a vtc Qwen-VL engine serves images
    return LLM(
        model=str(path), load_format="dummy", dtype=dtype, max_model_len=2048, seed=0, enforce_eager=True,
        enable_prefix_caching=False, limit_mm_per_prompt=limits, hf_overrides=hf_overrides,
    )  # fmt: skip


def make_request(size: int, keep, seed: int, family: str) -> dict:
    from vtc.testing import make_image

    request = {"prompt": PROMPTS[family], "multi_modal_data": {"image": make_image(seed, size)}}
    if keep is not None:
        request["mm_processor_kwargs"] = {"vtc_keep": keep}
    return request


def ttft(llm, size: int, keep, seed: int, family: str) -> tuple[float, int]:
    """Wall time of one request with max_tokens=1 (encode + prefill + one token), and its prompt length."""
    from vllm import SamplingParams

    start = time.perf_counter()
    out = llm.generate(
        [make_request(size, keep, seed, family)], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False
    )
    return time.perf_counter() - start, len(out[0].prompt_token_ids)


def throughput(llm, size: int, keep, seed: int, family: str, args) -> float:
    """Requests/s of `args.requests` prompts (distinct images) submitted at once, `args.max_tokens` tokens each."""
    from vllm import SamplingParams

    batch = [make_request(size, keep, seed + i, family) for i in range(args.requests)]
    many = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(batch, many, use_tqdm=False)
    return args.requests / (time.perf_counter() - start)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cpu-mid", choices=sorted(ARCHS))
    parser.add_argument("--strategy", default="vtc_cls")
    parser.add_argument("--keeps", default="0.1,0.25,0.5")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ttft-runs", type=int, default=3, help="TTFT requests per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the settings, interleaved")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--out", default=None, help="write the table (markdown) and the numbers (.json) here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    from vtc.integrations.vllm import overrides

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    keeps = [float(k) for k in args.keeps.split(",")]
    settings = [("unpatched", None)] + [(f"{args.strategy} keep={keep}", keep) for keep in keeps]
    times = {name: {"ttft": [], "rps": [], "tokens": 0} for name, _ in settings}
    with tempfile.TemporaryDirectory() as tmp:
        size, family = write_model(args.arch, Path(tmp))
        engines = {"unpatched": engine(Path(tmp), dtype, None, family)}
        engines["vtc"] = engine(Path(tmp), dtype, overrides(args.strategy, keep=keeps[0]), family)
        seed = 10
        for _name, keep in settings:  # warm-up
            ttft(engines["unpatched" if keep is None else "vtc"], size, keep, seed, family)
        for _ in range(args.rounds):  # the settings interleaved, so drifts in machine load hit them alike
            for name, keep in settings:
                llm = engines["unpatched" if keep is None else "vtc"]
                for _ in range(args.ttft_runs):
                    seed += 1
                    seconds, times[name]["tokens"] = ttft(llm, size, keep, seed, family)
                    times[name]["ttft"].append(seconds)
                seed += args.requests
                times[name]["rps"].append(throughput(llm, size, keep, seed, family, args))
        for llm in engines.values():
            close(llm)
    rows = [
        {
            "setting": name,
            "keep": keep,
            "prompt_tokens": times[name]["tokens"],
            "ttft_s": statistics.median(times[name]["ttft"]),
            "req_per_s": statistics.median(times[name]["rps"]),
        }
        for name, keep in settings
    ]
    base = rows[0]
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    lines = [
        f"vtc in vLLM: {args.arch} (random weights), {dtype}, {device}, {datetime.date.today()}; "
        f"medians over {args.rounds} interleaved rounds: requests/s of {args.requests} requests x {args.max_tokens} "
        f"tokens, TTFT of {args.rounds * args.ttft_runs} single requests",
        "",
        "| setting | prompt tokens | TTFT (s) | TTFT vs unpatched | requests/s | requests/s vs unpatched |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['prompt_tokens']} | {r['ttft_s']:.3f} | {r['ttft_s'] / base['ttft_s']:.2f}x | "
            f"{r['req_per_s']:.2f} | {r['req_per_s'] / base['req_per_s']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.write_text(table + "\n")
        meta = {"arch": args.arch, "dtype": dtype, "device": device, "date": str(datetime.date.today()), "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":  # vLLM's engine workers are spawned: the guard keeps them from rerunning main()
    main()
