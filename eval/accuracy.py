"""Held-out accuracy of the tiny trained VLM, unpatched and under every vtc strategy at several budgets.

    python eval/accuracy.py                    # 500 held-out samples, keep 1.0 / 0.5 / 0.25 / 0.1
    python eval/accuracy.py --n 100 --strategies fastv vtc_cls

The model and processor come from `vtc.testing.load_tiny_vlm()` (assets/tiny_vlm, trained by
eval/train_tiny_vlm.py); the samples are the first `--n` of the held-out split
`vtc.data.make_scene_qa(n, vtc.data.HELDOUT_SEED)`. Generation is greedy and batched with left padding; the
first generated word is the answer. Accuracy is reported overall, per question kind, and for small-object
questions apart ("small": the answer hinges on a 16 px object; "large": the others).

Writes eval/results/accuracy.csv (one row per strategy, keep and group), accuracy.md (a table) and
accuracy.png (accuracy vs keep per strategy, one panel per group).
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import vtc
from vtc import data
from vtc.strategies.base import prunes_images
from vtc.testing import load_tiny_vlm, tiny_vlm_dir

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("all", *data.KINDS, "small", "large")
UNPATCHED = "unpatched"


def groups_of(sample: dict) -> list[str]:
    """The report groups a sample counts in (overall, its kind, small/large, kind/small)."""
    size = "small" if sample["small"] else "large"
    return ["all", sample["kind"], size, f"{sample['kind']}/{size}"]


def prepare(processor, samples: list[dict], batch_size: int) -> list[dict]:
    """Processor outputs of the samples in batches (left padded), computed once for every configuration."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        texts = []
        for s in chunk:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}]
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        batches.append(processor(images=[s["image"] for s in chunk], text=texts, return_tensors="pt", padding=True))
    return batches


@torch.no_grad()
def answers(model, processor, batches: list[dict], strategy: str | None, keep: float | None, desc: str,
            weights: Path | None = None):
    """Generated answer words for every sample, and the mean estimated prefill-FLOPs ratio (1.0 unpatched).

    keep=None takes the strategy's default; `weights` are a learned strategy's trained parameters."""
    words, flops = [], []
    options = {"processor": processor}  # for the strategies that build prompts with it (QuoTA)
    if weights is not None:
        options["weights"] = str(weights)
    handle = vtc.patch(model, strategy=strategy, keep=keep, **options) if strategy else None
    try:
        for inputs in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            for text in processor.batch_decode(new, skip_special_tokens=True):
                parts = text.split()
                words.append(parts[0] if parts else "")
            if handle is not None:
                flops += [s.flops_ratio for s in handle.report().samples]
    finally:
        if handle is not None:
            handle.unpatch()
    return words, (sum(flops) / len(flops) if flops else 1.0)


def score(samples: list[dict], words: list[str]) -> dict[str, tuple[int, int]]:
    """group -> (correct, total)."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s, w in zip(samples, words):
        for g in groups_of(s):
            tally[g][0] += w == s["answer"]
            tally[g][1] += 1
    return {g: (c, t) for g, (c, t) in tally.items()}


def write_outputs(rows: list[dict], out_dir: Path, n: int, failed: list[str] | None = None) -> None:
    """accuracy.csv (long format), accuracy.md (table) and accuracy.png (plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "accuracy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["strategy", "keep", "group", "correct", "total", "accuracy",
                                               "flops_ratio"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "accuracy": f"{r['accuracy']:.4f}", "flops_ratio": f"{r['flops_ratio']:.4f}"})

    table: dict[tuple[str, float], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        table[(r["strategy"], r["keep"])][r["group"]] = r
    counts = {g: r["total"] for (s, _), by in table.items() if s == UNPATCHED for g, r in by.items()}
    head = ["strategy", "keep", "LLM FLOPs", *(f"{g} (n={counts.get(g, 0)})" for g in GROUPS)]
    lines = [
        f"Held-out accuracy of the tiny VLM (assets/tiny_vlm) on the first {n} samples of "
        f"`vtc.data.make_scene_qa(n, HELDOUT_SEED)`; greedy decoding, first generated word. "
        "LLM FLOPs: estimated prefill FLOPs of the decoder relative to the unpatched model (vision tower excluded). "
        "small: questions whose answer hinges on a 16 px object.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for (strategy, keep), by in table.items():
        cells = [strategy, keep_label(keep), f"{next(iter(by.values()))['flops_ratio']:.0%}"]
        cells += [f"{by[g]['accuracy']:.1%}" if g in by else "-" for g in GROUPS]
        lines.append("| " + " | ".join(cells) + " |")
    small = [f"{k}/small" for k in data.KINDS]
    lines += [
        "",
        "Small-object questions per kind (the answer hinges on a 16 px object; for count: the scene holds one):",
        "",
        "| " + " | ".join(["strategy", "keep", *(f"{g} (n={counts.get(g, 0)})" for g in small)]) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * len(small)) + "|",
    ]
    for (strategy, keep), by in table.items():
        cells = [strategy, keep_label(keep), *(f"{by[g]['accuracy']:.1%}" if g in by else "-" for g in small)]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Configurations that failed (no row above):", "", *(f"- {f}" for f in failed)]
    (out_dir / "accuracy.md").write_text("\n".join(lines) + "\n")
    plot(table, out_dir / "accuracy.png", n)


def keep_label(keep: float | None) -> str:
    return "learned" if keep is None else f"{keep:g}"


def plot(table: dict, path: Path, n: int) -> None:
    """One panel per group: accuracy vs keep, a line per strategy, the unpatched accuracy dashed (rows with
    learned budgets, keep=None, are in the table only)."""
    table = {(s, k): by for (s, k), by in table.items() if k is not None}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted({s for s, _ in table if s != UNPATCHED})
    keeps = sorted({k for _, k in table})
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), sharex=True, sharey=True)
    for ax, group in zip(axes.flat, GROUPS):
        base = table.get((UNPATCHED, 1.0), {}).get(group)
        if base is not None:
            ax.axhline(base["accuracy"], color="k", ls="--", lw=1, label="unpatched")
        for i, strategy in enumerate(strategies):
            points = sorted((k, by[group]["accuracy"]) for (s, k), by in table.items() if s == strategy and group in by)
            if points:  # 20 distinct colours, and a marker per colour cycle, so that no two lines look alike
                ax.plot(*zip(*points), marker="os^Dv"[i // 10 % 5], color=plt.cm.tab20(2 * i % 20 + i // 10 % 2),
                        label=strategy)
        total = base["total"] if base is not None else 0
        ax.set_title(f"{group} (n={total})")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(keeps, labels=[f"{k:g}" for k in keeps])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("keep (fraction of visual tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9)
    fig.suptitle(f"tiny VLM, synthetic grounding task: accuracy vs visual-token budget ({n} held-out samples)")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="held-out samples")
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", default=None, help="model directory (default: assets/tiny_vlm)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    strategies = args.strategies or [s for s in vtc.list_strategies() if s != "none" and prunes_images(s)]

    model, processor = load_tiny_vlm(args.model)
    samples = data.make_scene_qa(args.n, data.HELDOUT_SEED)
    batches = prepare(processor, samples, args.batch_size)
    configs = [(UNPATCHED, None, 1.0, None)] + [(s, s, k, None) for s in strategies for k in args.keeps]
    for strategy in strategies:  # learned parts trained by eval/train_strategy_weights.py, when present
        path = Path(args.model or tiny_vlm_dir()) / "strategies" / f"{strategy}.safetensors"
        if path.is_file():
            configs.append((f"{strategy}+weights", strategy, None, path))
    rows = []
    started = time.time()
    failed = []
    for name, strategy, keep, weights in tqdm(configs, desc="configurations", dynamic_ncols=True):
        label = f"{name} keep={keep_label(keep)}"
        try:
            words, flops = answers(model, processor, batches, strategy, keep, desc=label, weights=weights)
        except Exception as error:  # one broken strategy must not lose the other rows; it is reported
            failed.append(f"{label}: {type(error).__name__}: {error}")
            tqdm.write(f"FAILED {failed[-1]}")
            continue
        for group, (correct, total) in sorted(score(samples, words).items()):
            rows.append({"strategy": name, "keep": keep, "group": group, "correct": correct, "total": total,
                         "accuracy": correct / total, "flops_ratio": flops})
        overall = next(r for r in rows if r["strategy"] == name and r["keep"] == keep and r["group"] == "all")
        tqdm.write(f"{label:>24} accuracy {overall['accuracy']:.1%}  LLM FLOPs {flops:.0%}")
    write_outputs(rows, args.out, args.n, failed)
    print(f"wrote {args.out}/accuracy.{{csv,md,png}} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
