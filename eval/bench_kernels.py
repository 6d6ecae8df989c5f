"""Benchmark the similarity ops: Triton kernel vs PyTorch reference vs a naive implementation.

    python eval/bench_kernels.py           # GPU: N {576, 2880, 10000} x D {1024, 2048, 4096} x B {1, 4, 16}
    python eval/bench_kernels.py --quick   # tiny CPU smoke run
    python eval/bench_kernels.py --ops kcenter --tokens 576 --dims 4096 --batches 1,16 --peak-gbps 3350

For every (op, B, N, D) it times each implementation (median of ``--repeats`` after ``--warmup``; CUDA
events on GPU, ``perf_counter`` on CPU), checks the Triton result against the reference (indices equal
/ values close, column ``check``), and reports achieved memory bandwidth from a byte model of the
compulsory traffic, as a fraction of the device's peak (table below, or ``--peak-gbps``). Writes a CSV
and a PNG (time vs. bytes, with the peak-bandwidth line when known).

Implementations:
  triton  vtc.ops with backend="triton" (on CPU only under TRITON_INTERPRET=1, which is not timing)
  torch   vtc.ops with backend="torch" (the vectorised references in vtc/kernels/reference.py)
  naive   straightforward code: broadcast cosine, k-center over a materialised (N, N) distance
          matrix, ToMe-as-published merge (score matrix + sort + scatter, no reordering), and DART's
          per-row Python set loop; skipped when it would be too large.

Byte models (per batch row, e = element size, k = k-center picks, r = merged, P = pivots):
  cosine       read 2 N D e + write 4 N^2       kcenter      read k N D e (one stream per greedy step)
  bipartite    read 2 N D e + write (N - r) D e duplication  read N D e + write 4 P N
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtc import kernels, ops  # noqa: E402

# Peak DRAM bandwidth in GB/s, matched by substring of torch.cuda.get_device_name() (first hit wins).
PEAK_GBPS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM (HBM3)
    "H800": 3350.0,
    "GH200": 4000.0,
    "B200": 8000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L40": 864.0,
    "L4": 300.0,
    "A10G": 600.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
    "V100": 900.0,
    "T4": 320.0,
}
OPS = ("cosine", "kcenter", "bipartite", "duplication")
IMPLS = ("triton", "torch", "naive")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------ naive
def naive_cosine(x: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(x.float()[:, :, None, :], x.float()[:, None, :, :], dim=-1)


def naive_kcenter(x: torch.Tensor, k: int) -> torch.Tensor:
    xn = F.normalize(x.float(), dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)  # (B, N, N) materialised
    B, N, _ = x.shape
    rows = torch.arange(B, device=x.device)
    out = torch.zeros(B, k, dtype=torch.long, device=x.device)
    mind = torch.full((B, N), float("inf"), device=x.device)
    c = out[:, 0]
    for step in range(1, k):
        mind = torch.minimum(mind, dist[rows, c])
        mind[rows, c] = float("-inf")
        c = mind.argmax(dim=1)
        out[:, step] = c
    return out


def naive_tome(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe as published (unordered output [unmerged A, B]), size-weighted average."""
    xn = F.normalize(x.float(), dim=-1)
    scores = xn[:, ::2] @ xn[:, 1::2].transpose(1, 2)
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)[..., None]
    unm, src = edge[:, r:], edge[:, :r]
    dst = node_idx[..., None].gather(1, src)
    w = torch.cat([x.float(), torch.ones_like(x[..., :1], dtype=torch.float32)], dim=-1)  # [x * size, size]
    a, b = w[:, ::2], w[:, 1::2]
    C = w.shape[-1]
    b = b.scatter_reduce(1, dst.expand(-1, -1, C), a.gather(1, src.expand(-1, -1, C)), reduce="sum")
    out = torch.cat([a.gather(1, unm.expand(-1, -1, C)), b], dim=1)
    return (out[..., :-1] / out[..., -1:]).to(x.dtype), out[..., -1:]


def naive_dart(x: torch.Tensor, pivots: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, per pivot, with Python sets (the structure of DART's official loop)."""
    B, N, _ = x.shape
    P = pivots.shape[1]
    out = []
    for b in range(B):
        kept = set(pivots[b].tolist())
        cand = sorted(set(range(N)) - kept)
        rest = k - len(kept)
        for j, p in enumerate(pivots[b].tolist()):
            q = rest // P + (j < rest % P)
            sim = F.cosine_similarity(x[b, p].float()[None], x[b, cand].float(), dim=-1)
            top = [cand[i] for i in sim.topk(q, largest=False).indices.tolist()]
            kept.update(top)
            cand = sorted(set(cand) - set(top))
        out.append(sorted(kept))
    return torch.tensor(out, device=x.device)


# ------------------------------------------------------------------------------------ cases
def make_case(op: str, B: int, N: int, D: int, dtype: torch.dtype, device: str, k: int):
    """Returns (callables per impl, bytes moved, flops, checker(triton_out, torch_out) -> bool)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    e = x.element_size()
    if op == "cosine":
        fns = {impl: (lambda impl=impl: ops.pairwise_cosine(x, backend=impl)) for impl in ("triton", "torch")}
        fns["naive"] = lambda: naive_cosine(x)
        naive_elems = B * N * N * D
        nbytes, flops = B * (2 * N * D * e + 4 * N * N), 2 * B * N * N * D

        def check(a, b):
            return torch.allclose(a, b, atol=2e-3, rtol=0)
    elif op == "kcenter":
        k = min(k, N)
        fns = {impl: (lambda impl=impl: ops.kcenter(x, k, backend=impl)) for impl in ("triton", "torch")}
        fns["naive"] = lambda: naive_kcenter(x, k)
        naive_elems = B * N * N
        nbytes, flops = B * k * N * D * e, 2 * B * k * N * D
        check = torch.equal
    elif op == "bipartite":
        r = N // 4
        fns = {impl: (lambda impl=impl: ops.bipartite_merge(x, r, backend=impl)[0])
               for impl in ("triton", "torch")}
        fns["naive"] = lambda: naive_tome(x, r)[0]
        naive_elems = B * N * N // 4
        nbytes, flops = B * (3 * N - r) * D * e, 2 * B * (N // 2) ** 2 * D

        def check(a, b):
            return torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)
    elif op == "duplication":
        P, kk = 8, max(8, N // 9)
        pivots = torch.stack([torch.randperm(N, generator=g)[:P] for _ in range(B)]).to(device)
        fns = {impl: (lambda impl=impl: ops.duplication_select(x, pivots, kk, backend=impl))
               for impl in ("triton", "torch")}
        fns["naive"] = lambda: naive_dart(x, pivots, kk)
        naive_elems = B * N * 64 if B * N <= 16 * 2880 else 10**12  # Python loop: keep it to small cases
        nbytes, flops = B * (N * D * e + 4 * P * N), 2 * B * P * N * D
        check = torch.equal
    else:
        raise ValueError(op)
    return fns, naive_elems, nbytes, flops, check


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_peak(device: str, override: float | None) -> tuple[str, float | None]:
    if device != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name()
    if override is not None:
        return name, override
    return name, next((v for key, v in PEAK_GBPS.items() if key in name), None)


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    p.add_argument("--tokens", type=ints, default=None, help="N values (default by device)")
    p.add_argument("--dims", type=ints, default=None, help="D values (default by device)")
    p.add_argument("--batches", type=ints, default=None, help="B values (default by device)")
    p.add_argument("--k", type=int, default=64, help="k-center picks")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--peak-gbps", type=float, default=None, help="peak bandwidth, GB/s (overrides table)")
    p.add_argument("--naive-max-elems", type=float, default=None,
                   help="skip naive when its largest intermediate exceeds this many elements")
    p.add_argument("--out", default=None, help="output path prefix (writes .csv and .png)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    gpu = device == "cuda"
    if args.quick:
        defaults = dict(tokens=[64, 256], dims=[64], batches=[1, 2], repeats=3, warmup=1, k=16)
    elif gpu:
        defaults = dict(tokens=[576, 2880, 10000], dims=[1024, 2048, 4096], batches=[1, 4, 16],
                        repeats=20, warmup=3, k=args.k)
    else:
        defaults = dict(tokens=[576, 2880], dims=[1024], batches=[1, 4], repeats=5, warmup=1, k=args.k)
    tokens = args.tokens or defaults["tokens"]
    dims = args.dims or defaults["dims"]
    batches = args.batches or defaults["batches"]
    repeats = args.repeats or defaults["repeats"]
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    k = defaults["k"] if args.quick else args.k
    dtype = DTYPES[args.dtype or ("fp16" if gpu else "fp32")]
    naive_max = args.naive_max_elems or (4e9 if gpu else 2e8)
    dev_name, peak = device_peak(device, args.peak_gbps)
    triton_ok = kernels.triton_available() and (gpu or kernels.interpret_requested())
    triton_label = "triton" if gpu else "triton(interpret)"
    out = Path(args.out or f"eval/results/bench_kernels_{'gpu' if gpu else 'cpu'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device={dev_name} dtype={dtype} peak={peak} GB/s triton={'yes' if triton_ok else 'no'}")

    rows = []
    for op in args.ops.split(","):
        for B in batches:
            for N in tokens:
                for D in dims:
                    fns, naive_elems, nbytes, flops, check = make_case(op, B, N, D, dtype, device, k)
                    results = {}
                    for impl in args.impls.split(","):
                        row = dict(op=op, impl=impl, device=dev_name, dtype=str(dtype).split(".")[-1], B=B,
                                   N=N, D=D, bytes=nbytes, ms=math.nan, gbps=math.nan, frac_peak=math.nan,
                                   tflops=math.nan, check="", note="")
                        if impl == "triton" and not triton_ok:
                            row["note"] = "no GPU (set TRITON_INTERPRET=1 to smoke-test the interpreter)"
                        elif impl == "naive" and naive_elems > naive_max:
                            row["note"] = f"skipped: {naive_elems:.2g} elements"
                        else:
                            try:
                                results[impl] = fns[impl]()
                                ms = time_ms(fns[impl], device, warmup, repeats)
                                row.update(ms=ms, gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9)
                                if peak:
                                    row["frac_peak"] = row["gbps"] / peak
                                if impl == "triton":
                                    row["impl"] = triton_label
                            except torch.OutOfMemoryError:
                                row["note"] = "OOM"
                                torch.cuda.empty_cache()
                        rows.append(row)
                    if "triton" in results and "torch" in results:
                        ok = check(results["triton"], results["torch"])
                        for row in rows[-len(args.impls.split(",")):]:
                            row["check"] = "ok" if ok else "MISMATCH"
                    for row in rows[-len(args.impls.split(",")):]:
                        print(f"{op:12s} {row['impl']:18s} B={B:<3d} N={N:<6d} D={D:<5d} "
                              f"{row['ms']:10.3f} ms {row['gbps']:9.1f} GB/s  peak={row['frac_peak']:.2f}  "
                              f"{row['check']} {row['note']}")
    write_csv(rows, out.with_suffix(".csv"))
    plot(rows, peak, out.with_suffix(".png"), dev_name)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], peak: float | None, path: Path, title: str) -> None:
    """Time vs. modelled bytes per op (log-log), one series per implementation; the dashed line is
    bytes / peak bandwidth (the time a bandwidth-bound kernel at 100 % of peak would take)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op_names = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(op_names), figsize=(4.5 * len(op_names), 4), squeeze=False)
    for ax, op in zip(axes[0], op_names):
        for impl in dict.fromkeys(r["impl"] for r in rows if r["op"] == op):
            pts = sorted((r["bytes"], r["ms"]) for r in rows if r["op"] == op and r["impl"] == impl
                         and not math.isnan(r["ms"]))
            if pts:
                ax.plot(*zip(*pts), "o", label=impl, ms=4, alpha=0.8)
        if peak:
            xs = sorted({r["bytes"] for r in rows if r["op"] == op})
            ax.plot(xs, [b / peak / 1e6 for b in xs], "k--", lw=1, label=f"peak {peak:.0f} GB/s")
        ax.set(xscale="log", yscale="log", xlabel="modelled bytes", ylabel="median ms", title=op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"vtc similarity kernels on {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
