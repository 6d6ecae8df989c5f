"""Held-out accuracy of the tiny video VLM vs keep, for every video method, the baselines and the image methods
run per frame (issue 22).

    python eval/accuracy_video.py                  # 300 held-out clips, keep 0.5 / 0.25 / 0.1 (+ unpatched)
    python eval/accuracy_video.py --n 100 --strategies quota random

The model and processor come from `vtc.testing.load_tiny_video_vlm()` (assets/tiny_video_vlm, a Qwen2-VL trained
by eval/train_tiny_video_vlm.py); the clips are the first `--n` of `vtc.data.make_video_qa(n, HELDOUT_SEED)`
(8 frames of 112 px: 4 temporal patches x 16 visual tokens). Generation is greedy and batched with left padding;
the first generated word is the answer (`eval/accuracy.py`'s `answers`).

The method list is read from the registry (`vtc.list_strategies()`), so methods merged later join by themselves:
- video: the names in `VIDEO_METHODS` that are registered, and any registered strategy whose class says
  `modality = "video"`;
- baselines: `random` (a uniform random subset of each temporal patch) and `downsample` (uniform per-frame keep:
  each temporal patch's grid pooled to its budget);
- image methods: every other registered strategy; vtc gives each temporal patch its own budget (`vtc.budget`),
  so a pre-LLM image method selects within each frame ("per frame"), and an in-LLM one (FastV, ...) prunes the
  video's tokens in the decoder ("in the LLM"). A method that fails on video is listed under the table with its
  error.

Writes eval/results/accuracy_video.csv, accuracy_video.md (a table) and accuracy_video.png (accuracy vs keep, one
panel per question kind).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import vtc
from vtc import data
from vtc.strategies.base import get_strategy_class
from vtc.testing.qwen2_vl import load_tiny_video_vlm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import answers, keep_label  # noqa: E402  (eval/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("all", *data.VIDEO_KINDS)
UNPATCHED = "unpatched"
VIDEO_METHODS = ("dycoke", "fastvid", "prunevid", "holitom", "evs", "vidcom2", "quota")
BASELINES = ("random", "downsample")
FAMILY_LABEL = {"video": "video method", "baseline": "baseline", "image": "image method, per frame",
                "image-llm": "image method, in the LLM", "-": "-"}


def family(strategy: str) -> str:
    if strategy in VIDEO_METHODS or getattr(get_strategy_class(strategy), "modality", None) == "video":
        return "video"
    if strategy in BASELINES:
        return "baseline"
    return "image" if get_strategy_class(strategy).stage == "pre_llm" else "image-llm"


def method_list() -> list[str]:
    """Registered strategies, video methods first, then the baselines, then the image methods."""
    names = [s for s in vtc.list_strategies() if s != "none"]
    order = {"video": 0, "baseline": 1, "image": 2, "image-llm": 3}
    return sorted(names, key=lambda s: (order[family(s)], s))


def prepare(processor, samples: list[dict], batch_size: int) -> list[dict]:
    """Processor outputs of the clips in batches (left padded), computed once for every configuration."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": s["question"]}]}],
            add_generation_prompt=True) for s in chunk]
        batches.append(processor(text=texts, videos=[s["video"] for s in chunk], return_tensors="pt", padding=True))
    return batches


def score(samples: list[dict], words: list[str]) -> dict[str, tuple[int, int]]:
    """group -> (correct, total)."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s, w in zip(samples, words):
        for g in ("all", s["kind"]):
            tally[g][0] += w == s["answer"]
            tally[g][1] += 1
    return {g: (c, t) for g, (c, t) in tally.items()}


def write_outputs(rows: list[dict], out_dir: Path, n: int, failed: list[str], seconds: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "accuracy_video.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["strategy", "family", "keep", "group", "correct", "total", "accuracy",
                                               "flops_ratio"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "accuracy": f"{r['accuracy']:.4f}", "flops_ratio": f"{r['flops_ratio']:.4f}"})
    table: dict[tuple[str, float], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        table[(r["strategy"], r["keep"])][r["group"]] = r
    counts = {g: r["total"] for (s, _), by in table.items() if s == UNPATCHED for g, r in by.items()}
    head = ["method", "kind of method", "keep", "LLM FLOPs", *(f"{g} (n={counts.get(g, 0)})" for g in GROUPS)]
    lines = [
        f"Held-out accuracy of the tiny video VLM (assets/tiny_video_vlm, Qwen2-VL) on the first {n} clips of "
        "`vtc.data.make_video_qa(n, HELDOUT_SEED)` (8 frames, 64 visual tokens a clip); greedy decoding, first "
        "generated word. LLM FLOPs: estimated prefill FLOPs of the decoder relative to the unpatched model (vision "
        f"tower excluded). `python eval/accuracy_video.py --n {n}`: {len(table)} configurations in {seconds:.0f} s.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|",
    ]
    for (strategy, keep), by in table.items():
        first = next(iter(by.values()))
        cells = [strategy, FAMILY_LABEL[first["family"]], keep_label(keep), f"{first['flops_ratio']:.0%}"]
        cells += [f"{by[g]['accuracy']:.1%}" if g in by else "-" for g in GROUPS]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Configurations that failed on video (no row above):", "", *(f"- {f}" for f in failed)]
    lines += ["", "Overall accuracy by keep (the same run):", "", *summary_table(table)]
    (out_dir / "accuracy_video.md").write_text("\n".join(lines) + "\n")
    plot(table, out_dir / "accuracy_video.png", n)


def summary_table(table: dict) -> list[str]:
    """Markdown lines: one row per method, its overall accuracy at each keep (the README's table)."""
    keeps = sorted({k for s, k in table if s != UNPATCHED}, reverse=True)
    base = table.get((UNPATCHED, 1.0), {}).get("all")
    lines = ["| method | kind of method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
             "|---|---|" + "---:|" * len(keeps)]
    if base is not None:
        lines.append(f"| unpatched | - | {base['accuracy']:.1%} (all tokens) |" + " |" * (len(keeps) - 1))
    for method in dict.fromkeys(s for s, _ in table if s != UNPATCHED):
        by_keep = {k: by["all"] for (s, k), by in table.items() if s == method and "all" in by}
        kind = FAMILY_LABEL[next(iter(by_keep.values()))["family"]]
        cells = [f"{by_keep[k]['accuracy']:.1%}" if k in by_keep else "-" for k in keeps]
        lines.append(f"| `{method}` | {kind} | " + " | ".join(cells) + " |")
    return lines


def plot(table: dict, path: Path, n: int) -> None:
    """One panel per group: accuracy vs keep, a line per method (video methods thick, baselines black, image
    methods per frame thin), the unpatched accuracy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [s for s in dict.fromkeys(s for s, _ in table) if s != UNPATCHED]
    keeps = sorted({k for _, k in table})
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4 * len(GROUPS) + 2, 4.5), sharey=True)
    for ax, group in zip(axes, GROUPS):
        base = table.get((UNPATCHED, 1.0), {}).get(group)
        if base is not None:
            ax.axhline(base["accuracy"], color="k", ls="--", lw=1, label="unpatched")
        for i, method in enumerate(methods):
            points = sorted((k, by[group]["accuracy"]) for (s, k), by in table.items() if s == method and group in by)
            if not points:
                continue
            kind = next(by[group]["family"] for (s, _), by in table.items() if s == method and group in by)
            style = {"video": dict(lw=2.5, marker="o"), "baseline": dict(lw=1.5, marker="s", ls=":"),
                     "image": dict(lw=0.9, marker="^", alpha=0.8),
                     "image-llm": dict(lw=0.9, marker="v", alpha=0.8)}[kind]
            ax.plot(*zip(*points), color=plt.cm.tab20(2 * i % 20 + i // 10 % 2), label=method, **style)
        ax.set_title(f"{group} (n={base['total'] if base else 0})")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(keeps, labels=[f"{k:g}" for k in keeps])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("keep (fraction of visual tokens)")
    axes[0].set_ylabel("held-out accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    columns = (len(labels) + 17) // 18  # at most 18 entries a column fit the figure's height
    fig.legend(handles, labels, loc="center right", fontsize=8, ncol=columns)
    fig.suptitle(f"tiny video VLM (Qwen2-VL), moving-shapes clips: accuracy vs visual-token budget ({n} clips)")
    fig.tight_layout(rect=(0, 0, 1 - 0.07 * columns, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="held-out clips")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", default=None, help="model directory (default: assets/tiny_video_vlm)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    strategies = args.strategies or method_list()
    model, processor = load_tiny_video_vlm(args.model)
    samples = data.make_video_qa(args.n, data.HELDOUT_SEED)
    batches = prepare(processor, samples, args.batch_size)
    configs = [(UNPATCHED, 1.0)] + [(s, k) for s in strategies for k in args.keeps]
    rows, failed = [], []
    started = time.time()
    for name, keep in tqdm(configs, desc="configurations", dynamic_ncols=True):
        label = f"{name} keep={keep_label(keep)}"
        strategy = None if name == UNPATCHED else name
        try:
            words, flops = answers(model, processor, batches, strategy, None if strategy is None else keep, label)
        except Exception as error:  # one method that does not take video must not lose the other rows
            failed.append(f"{label}: {type(error).__name__}: {str(error)[:200]}")
            tqdm.write(f"FAILED {failed[-1]}")
            continue
        kind = "-" if strategy is None else family(name)
        for group, (correct, total) in sorted(score(samples, words).items()):
            rows.append({"strategy": name, "family": kind, "keep": keep, "group": group, "correct": correct,
                         "total": total, "accuracy": correct / total, "flops_ratio": flops})
        overall = next(r for r in rows if r["strategy"] == name and r["keep"] == keep and r["group"] == "all")
        tqdm.write(f"{label:>24} accuracy {overall['accuracy']:.1%}  LLM FLOPs {flops:.0%}")
    seconds = time.time() - started
    write_outputs(rows, args.out, args.n, failed, seconds)
    print(f"wrote {args.out}/accuracy_video.{{csv,md,png}} in {seconds:.0f}s")


if __name__ == "__main__":
    main()
