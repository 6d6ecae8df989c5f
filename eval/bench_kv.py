"""Decode-time KV policies on CPU: peak KV-cache memory and decode tokens/s vs the unpatched model.

One image prompt (576 visual tokens on the mid-size LLaVA config: hidden 1024, 8 decoder layers), greedy
generation of N tokens (forced: no early stop). For every run:
- KV bytes: the bytes of the cache's key and value tensors, the largest after any forward (prefill or decode
  step) and at the end. During the prefill every policy here still holds the whole prompt's cache until the
  policy evicts at the end of it (the decoder's hooks evict after the prefill), so that transient is the
  unpatched prompt's size; "prompt KV" reports it.
- decode tokens/s: (N - 1) / the time from the end of the prefill forward to the end of generate().
All runs are in one process, one after another; on a shared CPU only the ratios within one run mean much.

    python eval/bench_kv.py                      # mid-size config, 512 new tokens, budget 128
    python eval/bench_kv.py --tokens 256 --budget 64
    python eval/bench_kv.py --quick              # tiny config, 32 new tokens: a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import vtc
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor


def model_and_inputs(quick: bool):
    if quick:
        model, processor = tiny_llava("llama", seed=0), tiny_llava_processor()
    else:
        kwargs = dict(
            image_size=336,
            patch_size=14,
            vision_layers=4,
            vision_hidden=256,
            text_layers=8,
            text_hidden=1024,
            initializer_range=0.02,
        )
        model, processor = tiny_llava("llama", seed=0, **kwargs), tiny_llava_processor(image_size=336, patch_size=14)
    inputs = llava_inputs(processor, ["Describe the picture in detail, please."], [[make_image(5, size=336)]])
    return model, inputs


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run(model, inputs, tokens: int, strategy=None, keep=None, kv=None, budget=None, kv_options=None) -> dict:
    marks: dict[str, float] = {}
    sizes: list[int] = []

    def after_forward(module, args, kwargs, output):
        marks.setdefault("prefill_end", time.perf_counter())
        sizes.append(cache_bytes(output.past_key_values))

    hook = model.register_forward_hook(after_forward, with_kwargs=True)
    handle = None
    if strategy is not None or kv is not None:
        handle = vtc.patch(model, strategy, keep, kv=kv, kv_budget=budget, kv_options=kv_options)
    try:
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                return_dict_in_generate=True,
            )
            end = time.perf_counter()
        prompt_entries = None
        if handle is not None and handle.kv_policy is not None:
            report = handle.kv_policy.report()
            prompt_entries = max(report.samples[0].prompt_entries)
    finally:
        hook.remove()
        if handle is not None:
            handle.unpatch()
    config = model.config.text_config
    per_entry = (
        2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    )
    per_entry *= torch.finfo(model.dtype).bits // 8
    prompt_len = inputs["input_ids"].shape[1]
    return {
        "strategy": strategy,
        "keep": keep,
        "kv": kv,
        "kv_budget": budget,
        "kv_options": kv_options,
        "prompt_tokens": prompt_len,
        "prompt_kv_bytes": (prompt_entries if prompt_entries is not None else prompt_len) * per_entry,
        "peak_kv_bytes": max(sizes),
        "final_kv_bytes": cache_bytes(out.past_key_values),
        "prefill_s": marks["prefill_end"] - start,
        "decode_s": end - marks["prefill_end"],
        "decode_tokens_per_s": (tokens - 1) / (end - marks["prefill_end"]),
        "generated": out.sequences.shape[1] - prompt_len,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config and 32 new tokens (a smoke run)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 512, quick: 32)")
    parser.add_argument("--budget", type=int, default=None, help="KV budget (default 128, quick: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.tokens or (32 if args.quick else 512)
    budget = args.budget or (16 if args.quick else 128)
    model, inputs = model_and_inputs(args.quick)

    runs = [
        dict(),  # unpatched
        dict(kv="streaming", budget=10**6),  # vtc's decoder loop, nothing evicted: the loop's own cost
        dict(kv="streaming", budget=budget),
        dict(kv="h2o", budget=budget),
        dict(kv="snapkv", budget=budget),
        dict(kv="visual_aware", budget=budget, kv_options={"visual_budget": budget // 2}),
        dict(strategy="fastv", keep=0.25, kv="snapkv", budget=budget),
    ]
    run(model, inputs, 2)  # warm-up
    results = [run(model, inputs, tokens, **r) for r in runs]
    base = results[0]
    head = f"{'run':<34} {'prompt KV':>10} {'peak KV':>10} {'final KV':>10} {'vs unp.':>8}"
    head += f" {'decode tok/s':>12} {'ratio':>6}"
    print(f"bench_kv: {tokens} new tokens after a {base['prompt_tokens']}-token image prompt, budget {budget}")
    print(head)
    print("-" * len(head))
    for r in results:
        name = "unpatched"
        if r["kv"]:
            name = f"{r['kv']}({'none' if r['kv_budget'] >= 10**6 else r['kv_budget']})"
            if r["strategy"]:
                name = f"{r['strategy']}({r['keep']}) + {name}"
        r["name"] = name
        r["peak_kv_ratio"] = r["peak_kv_bytes"] / base["peak_kv_bytes"]
        r["decode_speed_ratio"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(
            f"{name:<34} {r['prompt_kv_bytes'] / 2**20:>8.2f}Mi {r['peak_kv_bytes'] / 2**20:>8.2f}Mi "
            f"{r['final_kv_bytes'] / 2**20:>8.2f}Mi {r['peak_kv_ratio']:>7.1%} {r['decode_tokens_per_s']:>12.1f} "
            f"{r['decode_speed_ratio']:>6.2f}"
        )
    print("peak KV = largest cache after any forward; prompt KV = held during the prefill before eviction")
    config = model.config.text_config
    payload = {
        "config": {
            "quick": args.quick,
            "text_hidden": config.hidden_size,
            "text_layers": config.num_hidden_layers,
            "kv_heads": config.num_key_value_heads,
            "prompt_tokens": base["prompt_tokens"],
            "new_tokens": tokens,
            "budget": budget,
            "dtype": str(model.dtype),
        },
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "note": "CPU timings from one process; the machine may be shared, so compare ratios within this run",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
