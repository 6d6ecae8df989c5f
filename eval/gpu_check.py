"""The steps of `eval/gpu_check.sh` (issue 23): kernels, real-size speed, the attention path. Each writes into
`--out`; `--cpu-smoke` runs the same code on tiny models and small sizes on the CPU (CI), where only the code
paths, not the numbers, mean anything.

    python eval/gpu_check.py kernels --out DIR [--cpu-smoke]   # Triton vs PyTorch: indices equal? times, thresholds
    python eval/gpu_check.py speed --out DIR [--cpu-smoke]     # TTFT / decode tok/s, overhead, roofline (eval/bench.py)
    python eval/gpu_check.py sdpa --out DIR [--cpu-smoke]      # which SDPA backend vtc's decoder loop runs, its cost
    python eval/gpu_check.py summary --out DIR                 # summary.md from the files above
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vtc  # noqa: E402
from eval import bench  # noqa: E402
from eval.bench_kernels import time_ms  # noqa: E402
from vtc import ops  # noqa: E402

SPEED_MODELS = ("llava-1.5-7b", "qwen2.5-vl-7b")
SMOKE_MODELS = {"llava-1.5-7b": "tiny", "qwen2.5-vl-7b": "tiny-qwen2.5-vl"}  # the same code paths, tiny
SPEED_STRATEGIES = ("vtc_cls", "visionzip", "fastv", "todre", "dart")
KEEPS = (0.1, 0.25, 0.5)
THRESHOLDS = {  # op -> the vtc.ops constant that decides Triton vs torch for backend=None on CUDA
    "cosine": "TRITON_MIN_TOKENS_COSINE",
    "kcenter": "TRITON_MIN_TOKENS_KCENTER",
    "bipartite": "TRITON_MIN_TOKENS_BIPARTITE",
    "duplication": "TRITON_MIN_TOKENS_DUPLICATION",
}


def _device(smoke: bool) -> str:
    if smoke:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU code-path check")
    return "cuda"


# ------------------------------------------------------------------------------------------------- kernels
def _kernel_case(op: str, n: int, d: int, dtype: torch.dtype, device: str, batch: int):
    """(run(backend) -> output, equal(a, b) -> (bool, detail)) for one op at N tokens of width d."""
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(batch, n, d, generator=g).to(device=device, dtype=dtype)
    k = min(64, n // 4)
    if op == "cosine":
        def run(backend):
            return ops.pairwise_cosine(x, backend=backend)

        def equal(a, b):  # values, and the index of each row's nearest other token
            eye = torch.eye(n, dtype=torch.bool, device=a.device)
            same = torch.equal(a.masked_fill(eye, -2).argmax(-1), b.masked_fill(eye, -2).argmax(-1))
            return same, f"max |diff| {float((a - b).abs().max()):.2e}"
    elif op == "kcenter":
        def run(backend):
            return ops.kcenter(x, k, backend=backend)

        def equal(a, b):
            return torch.equal(a, b), f"k={k}"
    elif op == "bipartite":
        def run(backend):
            return ops.bipartite_match(x, n // 4, backend=backend)

        def equal(a, b):
            return all(torch.equal(u, v) for u, v in zip(a, b)), f"r={n // 4}"
    elif op == "duplication":
        pivots = torch.stack([torch.randperm(n, generator=g)[:8] for _ in range(batch)]).to(device)

        def run(backend):
            return ops.duplication_select(x, pivots, max(8, n // 9), backend=backend)

        def equal(a, b):
            return torch.equal(a, b), f"k={max(8, n // 9)}, 8 pivots"
    else:
        raise ValueError(op)
    return run, equal


def kernels(args) -> list[dict]:
    from vtc import kernels as vk

    device = _device(args.cpu_smoke)
    if not vk.triton_available() or (device == "cpu" and not vk.interpret_requested()):
        raise SystemExit("Triton cannot run here: install triton (GPU) or set TRITON_INTERPRET=1 (CPU smoke)")
    tokens = [48] if args.cpu_smoke else [576, 2880, 10000]
    dims = [32] if args.cpu_smoke else [1024, 4096]
    batches = [1] if args.cpu_smoke else [1, 8]
    repeats, warmup = (1, 0) if args.cpu_smoke else (10, 2)
    rows = []
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for op in THRESHOLDS:
            for batch in batches:
                for d in dims:
                    for n in tokens:
                        run, equal = _kernel_case(op, n, d, dtype, device, batch)
                        same, detail = equal(run("triton"), run("torch"))
                        t_triton = time_ms(lambda run=run: run("triton"), device, warmup, repeats)
                        t_torch = time_ms(lambda run=run: run("torch"), device, warmup, repeats)
                        row = dict(op=op, dtype=dtype_name, B=batch, N=n, D=d, indices_equal=same, detail=detail,
                                   triton_ms=t_triton, torch_ms=t_torch, triton_speedup=t_torch / t_triton)
                        rows.append(row)
                        print(f"{op:11s} {dtype_name} B={batch} N={n:<5d} D={d:<4d} equal={same!s:5s} "
                              f"triton {t_triton:8.3f} ms  torch {t_torch:8.3f} ms  {detail}", flush=True)
    out = Path(args.out)
    (out / "kernels.json").write_text(json.dumps({"device": _device_name(device), "rows": rows}, indent=1))
    thresholds = implied_thresholds(rows)
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=1))
    for op, t in thresholds.items():
        print(f"{op:11s} current {t['current']:>6}  implied {t['implied']}  ({t['why']})")
    return rows


def implied_thresholds(rows: list[dict]) -> dict:
    """Per op: the smallest measured N from which Triton is faster than torch at every larger measured N, for
    every dtype, batch and width (None: torch everywhere measured), beside the constant in vtc/ops.py."""
    out = {}
    for op, constant in THRESHOLDS.items():
        mine = [r for r in rows if r["op"] == op]
        ns = sorted({r["N"] for r in mine})
        wins = {n: all(r["triton_speedup"] > 1.0 for r in mine if r["N"] == n) for n in ns}
        implied = next((n for i, n in enumerate(ns) if all(wins[m] for m in ns[i:])), None)
        mismatches = sum(not r["indices_equal"] for r in mine)
        why = "Triton faster from here on" if implied is not None else "torch faster at some largest N measured"
        out[op] = dict(current=getattr(ops, constant), implied=implied, constant=constant, why=why,
                       index_mismatches=mismatches, cases=len(mine))
    return out


# --------------------------------------------------------------------------------------------------- speed
def speed(args) -> None:
    device = _device(args.cpu_smoke)
    models = [SMOKE_MODELS[m] for m in SPEED_MODELS] if args.cpu_smoke else list(SPEED_MODELS)
    for model in models:
        prefix = Path(args.out) / f"bench_{model.replace('.', '_')}"
        argv = ["--model", model, "--device", device, "--out", str(prefix)]
        argv += ["--strategies", *SPEED_STRATEGIES, "--keep", *map(str, KEEPS[1:2] if args.cpu_smoke else KEEPS)]
        if args.cpu_smoke:
            argv += ["--batch", "1", "2", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]
            argv += ["--dtype", "float32"]
        else:
            argv += ["--batch", "1", "8", "--repeats", "3", "--warmup", "2", "--new-tokens", "16"]
            argv += ["--dtype", "bfloat16"]
        print(f"eval/bench.py {' '.join(argv)}", flush=True)
        bench.main(argv)
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- sdpa
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backends(fn) -> list[str]:
    """The SDPA implementations the aten ops of one call ran (from the profiler's op names)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted({label for op, label in SDPA_OPS.items() if op in names})


def sdpa(args) -> dict:
    """Which SDPA backend vtc's decoder loop runs (it passes an explicit boolean mask) and the unpatched model
    (causal, no mask when nothing is padded); the prefill time of both at keep=1 (`none`: the same tokens, so
    the difference is the loop and its mask path), and the unpatched model forced onto the loop's backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = _device(args.cpu_smoke)
    name = SMOKE_MODELS["llava-1.5-7b"] if args.cpu_smoke else "llava-1.5-7b"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    repeats = 1 if args.cpu_smoke else 5
    model, processor, label = bench.load_model(name, dtype, device)
    timer = bench.Timer(device)
    result: dict = {"model": label, "device": _device_name(device), "dtype": str(dtype), "rows": []}
    with torch.no_grad():
        for batch in (1, 8) if not args.cpu_smoke else (1, 2):
            inputs = bench.make_inputs(model, processor, batch, device, name)

            def prefill(inputs=inputs):
                return model(**inputs, logits_to_keep=1)

            row = dict(batch=batch, tokens=int(inputs["input_ids"].shape[1]))
            row["unpatched_backends"] = sdpa_backends(prefill)
            row["unpatched_ms"] = 1000 * timer(prefill, repeats)
            with vtc.patched(model, "none"):
                row["vtc_backends"] = sdpa_backends(prefill)
                row["vtc_keep1_ms"] = 1000 * timer(prefill, repeats)
            row["vtc_over_unpatched"] = row["vtc_keep1_ms"] / row["unpatched_ms"]
            if device == "cuda":  # the unpatched model on each backend alone, where that backend takes the call
                for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
                    key = f"unpatched_only_{backend.name.lower()}_ms"
                    try:
                        with sdpa_kernel([backend]):
                            row[key] = 1000 * timer(prefill, repeats)
                    except RuntimeError as error:
                        row[key] = f"unavailable: {str(error).splitlines()[0][:120]}"
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    result["flash_attention_2"] = _flash_attention_2(name, dtype, device, repeats, args.cpu_smoke)
    print(json.dumps(result["flash_attention_2"]), flush=True)
    (Path(args.out) / "sdpa.json").write_text(json.dumps(result, indent=1))
    return result


def _flash_attention_2(name: str, dtype, device: str, repeats: int, smoke: bool) -> dict:
    """The unpatched model with attn_implementation="flash_attention_2" (when flash-attn or kernels is
    installed), and what vtc.patch says on it."""
    import importlib.util

    have = {p: importlib.util.find_spec(p) is not None for p in ("flash_attn", "kernels")}
    out: dict = {"installed": have}
    if smoke or device != "cuda" or not any(have.values()):
        out["skipped"] = "CPU smoke" if smoke or device != "cuda" else "neither flash-attn nor kernels installed"
        return out
    try:
        model, processor, _ = bench.load_model(name, dtype, device)
        model.set_attn_implementation("flash_attention_2")
        inputs = bench.make_inputs(model, processor, 1, device, name)
        with torch.no_grad():
            out["unpatched_fa2_ms"] = 1000 * bench.Timer(device)(lambda: model(**inputs, logits_to_keep=1), repeats)
            try:
                with vtc.patched(model, "fastv", keep=0.25):
                    out["fastv_0.25_fa2_ms"] = 1000 * bench.Timer(device)(
                        lambda: model(**inputs, logits_to_keep=1), repeats
                    )
            except ValueError as error:
                out["vtc_on_fa2"] = str(error)
    except Exception as error:  # an optional path: record why it did not run
        out["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return out


# ------------------------------------------------------------------------------------------------- summary
def summary(args) -> str:
    out = Path(args.out)
    lines = [f"# GPU check: {out.name}", ""]
    if (out / "thresholds.json").exists():
        lines += ["## Kernels vs PyTorch references", "", "| op | index mismatches | current threshold | implied |",
                  "| --- | --- | --- | --- |"]
        for op, t in json.loads((out / "thresholds.json").read_text()).items():
            lines.append(f"| {op} | {t['index_mismatches']} of {t['cases']} | {t['current']} | {t['implied']} |")
        lines.append("")
    for path in sorted(out.glob("bench_*.json")):
        rows = json.loads(path.read_text())
        lines += [f"## {rows[0]['model']} ({rows[0]['dtype']})", "",
                  "| strategy | keep | batch | visual | TTFT ms | unpatched ms | speedup | ideal | fraction | "
                  "overhead | decode tok/s | unpatched tok/s |", "| " + " | ".join(["---"] * 12) + " |"]
        for r in rows:
            if r.get("note"):
                lines.append(f"| {r['strategy']} | {r['keep']} | {r['batch']} | {r['note']} |" + " |" * 8)
                continue
            overhead = "-" if r["overhead"] is None else f"{r['overhead']:.3f}"
            lines.append(
                f"| {r['strategy']} | {r['keep']} | {r['batch']} | {r['visual_last_layer']} | {r['ttft_ms']:.1f} | "
                f"{r['ttft_unpatched_ms']:.1f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                f"{r['fraction_of_ideal']:.2f} | {overhead} | {r['decode_tok_s']:.0f} | "
                f"{r['decode_tok_s_unpatched']:.0f} |"
            )
        lines.append("")
    if (out / "sdpa.json").exists():
        data = json.loads((out / "sdpa.json").read_text())
        lines += ["## Attention path", "", "```", json.dumps(data, indent=1), "```", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    print(text)
    return text


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["kernels", "speed", "sdpa", "summary"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models and sizes on the CPU (CI)")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"kernels": kernels, "speed": speed, "sdpa": sdpa, "summary": summary}[args.step](args)


if __name__ == "__main__":
    main()
