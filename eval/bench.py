"""`vtc bench`: what each strategy saves, on one model, in one run.

For a model x strategies x keep ratios x batch sizes it measures prefill latency (TTFT), decode tokens/s,
peak memory (CUDA) or KV-cache bytes (CPU), visual tokens per layer, analytic LLM prefill FLOPs, the
overhead ratio t(patched) / t(unpatched fed the equally short input), and a roofline column: the ideal
speedup from FLOPs and weight bytes at the device's peak, so every measured speedup is also shown as a
fraction of the ideal. Warm-up, repeats, medians; CUDA events on GPU. Only ratios within one run are
meaningful.

    python eval/bench.py --model tiny --keep 1.0 0.5 0.25 0.1            # CPU, seconds
    python eval/bench.py --model llava-1.5-7b --dtype bfloat16 --device cuda  # real architecture, random weights
    python eval/bench.py --model qwen2-vl-2b --text-layers 2 --keep 0.25       # vtc.testing.REAL_NAMES, cut
    python eval/bench.py --model /path/to/checkpoint                      # a local checkpoint

Outputs: <out>.csv, <out>.json and <out>_speedup.png, <out>_overhead.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vtc  # noqa: E402
from eval.bench_overhead import short_input_reference  # noqa: E402
from vtc.budget import prefill_flops  # noqa: E402
from vtc.strategies.base import prunes_images  # noqa: E402
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor  # noqa: E402
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl  # noqa: E402
from vtc.testing.real import REAL_NAMES, real_image_size, real_inputs, real_model  # noqa: E402

TINY_NAMES = ("tiny", "tiny-qwen2", "tiny-mistral", "tiny-qwen2.5-vl")

# bf16 dense peaks (TFLOP/s) and memory bandwidth (GB/s) of devices we may be lent
KNOWN_PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}


def load_model(
    name: str, dtype: torch.dtype, device: str, text_layers: int | None = None, vision_layers: int | None = None
):
    """(model, processor, label) for a tiny builder name, a real architecture (`vtc.testing.REAL_NAMES`: the
    published config with random weights, depth cut by `text_layers` / `vision_layers`), or a local checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if name in ("tiny", "tiny-qwen2", "tiny-mistral"):
        backbone = {"tiny": "llama", "tiny-qwen2": "qwen2", "tiny-mistral": "mistral"}[name]
        model, processor = tiny_llava(backbone), tiny_llava_processor()
    elif name == "tiny-qwen2.5-vl":  # the Qwen-VL code path in seconds (the GPU check's CPU smoke)
        model, processor = tiny_qwen_vl("qwen2_5_vl"), tiny_qwen_processor()
    elif name in REAL_NAMES:
        model, processor = real_model(name, text_layers, vision_layers, dtype=dtype, device=device)
        depth = model.config.text_config.num_hidden_layers
        name = name if text_layers is None else f"{name} ({depth} decoder layers)"
    elif Path(name).exists():
        model = AutoModelForImageTextToText.from_pretrained(name, attn_implementation="sdpa", dtype=dtype)
        processor = AutoProcessor.from_pretrained(name)
    else:
        known = ", ".join([*TINY_NAMES, *REAL_NAMES])
        raise ValueError(f"unknown model {name!r}; known: {known}, or a local checkpoint directory")
    return model.to(device=device, dtype=dtype).eval(), processor, name


def make_inputs(model, processor, batch: int, device: str, name: str = "tiny"):
    """A batch of one-image prompts; real architectures get an image of their native side (`real_image_size`)."""
    questions = ["Describe the picture in detail, please."] * batch
    if name in REAL_NAMES:
        size = real_image_size(name)
        inputs = dict(real_inputs(name, processor, questions, [[make_image(i, size=size)] for i in range(batch)]))
    elif name == "tiny-qwen2.5-vl":
        inputs = qwen_inputs(processor, questions, images=[[make_image(i, size=112)] for i in range(batch)])
    else:
        images = [[make_image(i, size=max(96, model.config.vision_config.image_size))] for i in range(batch)]
        inputs = dict(llava_inputs(processor, questions, images))
    return {k: v.to(device, model.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


class Timer:
    """Median wall time of a callable; CUDA events on GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn, repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def device_peaks(device: str, dtype: torch.dtype, peak_tflops: float | None, peak_gbps: float | None):
    """(FLOP/s, bytes/s) of the device: given, known by name, or measured (a GEMM and a copy) on CPU."""
    if peak_tflops and peak_gbps:
        return peak_tflops * 1e12, peak_gbps * 1e9
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, (tflops, gbps) in KNOWN_PEAKS.items():
            if key in name:
                return tflops * 1e12, gbps * 1e9
    n = 1024
    a, b = torch.randn(n, n, dtype=torch.float32), torch.randn(n, n, dtype=torch.float32)
    t = Timer("cpu")(lambda: a @ b, repeats=5)
    big = torch.empty(64 * 2**20 // 4)
    t_copy = Timer("cpu")(lambda: big.clone(), repeats=5)
    return 2 * n**3 / t, 2 * big.numel() * 4 / t_copy


def weight_bytes(model) -> int:
    lm = model.model.language_model
    return sum(p.numel() * p.element_size() for p in lm.layers.parameters())


def ideal_time(config, tokens_per_layer: list[int], weights: int, peaks) -> float:
    """Roofline: each decoder layer takes max(FLOPs / peak FLOP/s, weight bytes / peak bandwidth)."""
    flops_s, bytes_s = peaks
    per_layer_weights = weights / len(tokens_per_layer)
    return sum(max(prefill_flops(config, [n]) / flops_s, per_layer_weights / bytes_s) for n in tokens_per_layer)


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def run(args) -> list[dict]:
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    model, processor, label = load_model(
        args.model, dtype, args.device, getattr(args, "text_layers", None), getattr(args, "vision_layers", None)
    )
    timer = Timer(args.device)
    peaks = device_peaks(args.device, dtype, args.peak_tflops, args.peak_gbps)
    weights = weight_bytes(model)
    config = model.config.text_config
    strategies = args.strategies or [s for s in vtc.list_strategies() if s != "none" and prunes_images(s)]
    jobs = [(b, s, k) for b in args.batch for s in strategies for k in args.keep]
    rows = []
    base: dict[int, dict] = {}
    with torch.no_grad():
        for batch, name, keep in tqdm(jobs, desc="vtc bench", unit="run"):
            inputs = make_inputs(model, processor, batch, args.device, args.model)
            if batch not in base:
                base[batch] = measure(model, inputs, timer, args, None)
            try:
                handle = vtc.patch(model, name, keep=keep)
            except ValueError as error:  # a strategy this model cannot run: a row that says why
                rows.append({**dict.fromkeys(FIELDS), **dict(model=label, device=args.device, dtype=args.dtype,
                                                             batch=batch, strategy=name, keep=keep, note=str(error))})
                continue
            try:
                result = measure(model, inputs, timer, args, handle)
                sample = handle.report().samples[0]
                kept = handle.last_kept("final")[0]
                stage, layer = handle.strategy.stage, handle.strategy.llm_layer
            finally:
                handle.unpatch()
            overhead = None
            try:  # the reference reaches into the model's own helpers: a failure costs the column, not the run
                kept = kept.to(args.device)
                reference = None if batch > 1 else short_input_reference(model, inputs, kept, stage, layer)
                if reference is not None:
                    overhead = result["ttft_s"] / timer(reference, args.repeats)
            except Exception as error:  # noqa: BLE001
                print(f"no overhead for {name} at keep {keep}: {type(error).__name__}: {error}")
            full_length = sample.tokens_per_layer[0] + sample.visual_in - sample.visual_after_pre_llm
            ideal = ideal_time(config, sample.tokens_per_layer, weights, peaks)
            ideal_base = ideal_time(config, [full_length] * len(sample.tokens_per_layer), weights, peaks)
            speedup = base[batch]["ttft_s"] / result["ttft_s"]
            rows.append(
                dict(
                    model=label,
                    device=args.device,
                    dtype=args.dtype,
                    batch=batch,
                    strategy=name,
                    keep=keep,
                    visual_in=sample.visual_in,
                    visual_last_layer=sample.visual_per_layer[-1],
                    visual_per_layer=" ".join(map(str, sample.visual_per_layer)),
                    flops_ratio=sample.flops_ratio,
                    ttft_ms=1000 * result["ttft_s"],
                    ttft_unpatched_ms=1000 * base[batch]["ttft_s"],
                    speedup=speedup,
                    ideal_speedup=ideal_base / ideal,
                    fraction_of_ideal=speedup / (ideal_base / ideal),
                    decode_tok_s=result["decode_tok_s"],
                    decode_tok_s_unpatched=base[batch]["decode_tok_s"],
                    memory_bytes=result["memory"],
                    memory_bytes_unpatched=base[batch]["memory"],
                    overhead=overhead,
                    note="",
                )
            )
    return rows


FIELDS = (
    "model device dtype batch strategy keep visual_in visual_last_layer visual_per_layer flops_ratio ttft_ms "
    "ttft_unpatched_ms speedup ideal_speedup fraction_of_ideal decode_tok_s decode_tok_s_unpatched memory_bytes "
    "memory_bytes_unpatched overhead note"
).split()


def measure(model, inputs, timer: Timer, args, handle) -> dict:
    prefill = lambda: model(**inputs, logits_to_keep=1)  # noqa: E731
    ttft = timer(prefill, args.repeats, warmup=args.warmup)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def generate(n: int):
        return model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True
        )

    # decode rate from the difference of two generate() runs, so prefill and set-up cancel out
    t_one = timer(lambda: generate(1), max(1, args.repeats // 2), warmup=0)
    t_all = timer(lambda: generate(args.new_tokens), max(1, args.repeats // 2), warmup=0)
    out = generate(args.new_tokens)
    memory = torch.cuda.max_memory_allocated() if cuda else kv_bytes(out.past_key_values)
    decode_tokens = (args.new_tokens - 1) * inputs["input_ids"].shape[0]
    return {"ttft_s": ttft, "decode_tok_s": decode_tokens / max(t_all - t_one, 1e-9), "memory": memory}


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    rows = [r for r in rows if not r["note"]]
    if not rows:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    batch = min(r["batch"] for r in rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in sorted({r["strategy"] for r in rows}):
        pts = sorted(
            (r["keep"], r["speedup"], r["ideal_speedup"]) for r in rows if r["strategy"] == name and r["batch"] == batch
        )
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} measured")[0]
        ax.plot(
            [p[0] for p in pts],
            [p[2] for p in pts],
            ls="--",
            color=line.get_color(),
            alpha=0.6,
            label=f"{name} roofline ideal",
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("keep (fraction of visual tokens)")
    ax.set_ylabel("prefill speedup vs unpatched")
    ax.set_title(f"{rows[0]['model']} on {rows[0]['device']} ({rows[0]['dtype']}), batch {batch}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out.with_name(out.name + "_speedup.png"))
    fig.savefig(paths[-1], dpi=120)

    with_overhead = [r for r in rows if r["overhead"] is not None]
    if with_overhead:
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        labels = [f"{r['strategy']}\nkeep {r['keep']}" for r in with_overhead]
        ax.bar(range(len(labels)), [r["overhead"] for r in with_overhead], color="tab:blue")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        ax.set_ylabel("t(patched) / t(unpatched, short input)")
        ax.set_title("selection overhead (1.0 = free)")
        fig.tight_layout()
        paths.append(out.with_name(out.name + "_overhead.png"))
        fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tiny", help=f"{' | '.join(TINY_NAMES + REAL_NAMES)} | a local path"
    )
    parser.add_argument("--text-layers", type=int, default=None, help="real architectures: decoder layers kept")
    parser.add_argument("--vision-layers", type=int, default=None, help="real architectures: vision blocks kept")
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU by default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rows = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    for path in plot(rows, out):
        print(f"wrote {path}")
    print(
        f"{'strategy':>10} {'keep':>5} {'batch':>5} {'visual':>7} {'TTFT ms':>9} {'speedup':>8} {'ideal':>6} "
        f"{'overhead':>8} {'decode tok/s':>12}"
    )
    for r in rows:
        if r["note"]:
            print(f"{r['strategy']:>10} {r['keep']:>5} {r['batch']:>5}  not run: {r['note'][:150]}")
            continue
        overhead = f"{r['overhead']:.3f}" if r["overhead"] is not None else "-"
        print(
            f"{r['strategy']:>10} {r['keep']:>5} {r['batch']:>5} {r['visual_last_layer']:>7} {r['ttft_ms']:>9.1f} "
            f"{r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x {overhead:>8} {r['decode_tok_s']:>12.1f}"
        )


if __name__ == "__main__":
    main()
