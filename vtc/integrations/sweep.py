"""`vtc eval`: one table of accuracy against cost, through lmms-eval's Python API (`simple_evaluate`).

One loaded model (`VTCModel`), patched and unpatched between runs: the unpatched model, the `random` and
`downsample` baselines (VTC-Bench's rule: a method must beat them) and each chosen strategy at each keep, on the
chosen tasks. Each run (a "cell") is saved as `cells/<strategy>_<keep>.json` under the output directory once it
has finished, and a rerun with the same model, tasks and limit skips it (resumable). Then:

    sweep.csv, sweep.md  per task and cell: score (the task's first metric), relative score (to the unpatched
                         model), estimated LLM prefill GFLOPs per sample and their ratio to the unpatched model,
                         measured prefill time (median of 3 forwards of one batch of the first task's questions),
                         visual tokens per sample: in, after the pre-LLM stage, at the last decoder layer
    sweep.png            score vs estimated LLM FLOPs, one line per strategy over its keeps, baselines dashed

Under `accelerate launch` (data parallel) every process runs every cell on its share of the requests; the
first process writes the files.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path

import torch

BASELINES = ("random", "downsample")
UNPATCHED = "unpatched"


def cell_name(strategy: str, keep: float | None) -> str:
    return UNPATCHED if strategy == UNPATCHED else f"{strategy}_{keep:g}"


def main_metric(task_results: dict) -> tuple[str, float]:
    """The task's first numeric metric (lmms-eval keeps the order of the task's metric_list), e.g. acc,none."""
    for key, value in task_results.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
            return key, float(value)
    raise ValueError(f"no numeric metric in {sorted(task_results)}")


def _prefill_ms(lm, task, batch_size: int, repeats: int = 3) -> float:
    """Median wall time of one prefill (logits of the last token only) of the task's first `batch_size` docs."""
    docs = list(task.eval_docs)[:batch_size]
    images, prompts = [], []
    for doc in docs:
        visuals = task.doc_to_visual(doc) if task.doc_to_visual is not None else []
        visuals = [v.convert("RGB") for v in (visuals if isinstance(visuals, list) else [visuals])]
        images.append(visuals)
        prompts.append(lm._prompt(task.doc_to_text(doc), len(visuals)))
    inputs = lm._inputs(prompts, images)
    times = []
    with torch.inference_mode():
        lm.model(**inputs, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            lm.model(**inputs, logits_to_keep=1)
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def run_sweep(
    pretrained: str,
    tasks: list[str],
    strategies: list[str],
    keeps: list[float],
    out: str | Path,
    *,
    baselines: tuple[str, ...] = BASELINES,
    include_path: str | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    model_args: dict | None = None,
) -> list[dict]:
    """Run the missing cells, then write the table and the plot (first process). Returns the table's rows."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager, get_task_dict
    from tqdm import tqdm

    from .lmms_eval import VTCModel

    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    config = {"pretrained": pretrained, "tasks": tasks, "limit": limit, "model_args": model_args or {}}
    cells = [(UNPATCHED, None)] + [(s, k) for s in [*baselines, *strategies] for k in keeps]
    todo = [c for c in cells if not _finished(out, c, config)]
    lm = VTCModel(pretrained=pretrained, batch_size=batch_size, **(model_args or {}))
    task_manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    timing_task = next(iter(get_task_dict(tasks[:1], task_manager).values()))
    bar = tqdm(cells, desc="vtc eval", disable=lm.rank != 0, initial=len(cells) - len(todo), total=len(cells))
    for strategy, keep in todo:
        bar.set_postfix_str(cell_name(strategy, keep))
        lm.set_strategy(None if strategy == UNPATCHED else strategy, keep)
        results = simple_evaluate(
            model=lm, tasks=list(tasks), batch_size=batch_size, limit=limit, task_manager=task_manager,
            log_samples=False, verbosity="WARNING",
        )  # fmt: skip
        if lm.rank == 0:
            cell = {
                "config": config,
                "strategy": strategy,
                "keep": keep,
                "results": {t: dict(zip(("metric", "score"), main_metric(results["results"][t]))) for t in tasks},
                "throughput": results.get("throughput", {}),
                "prefill_ms": _prefill_ms(lm, timing_task, batch_size),
            }
            (out / "cells" / f"{cell_name(strategy, keep)}.json").write_text(json.dumps(cell, indent=1))
        bar.update(1)
    bar.close()
    lm.set_strategy(None)
    if lm.world_size > 1:
        lm.accelerator.wait_for_everyone()
    if lm.rank != 0:
        return []
    rows = table_rows([json.loads((out / "cells" / f"{cell_name(*c)}.json").read_text()) for c in cells], tasks)
    write_table(rows, out)
    plot(rows, out / "sweep.png", baselines)
    return rows


def _finished(out: Path, cell: tuple, config: dict) -> bool:
    path = out / "cells" / f"{cell_name(*cell)}.json"
    return path.is_file() and json.loads(path.read_text()).get("config") == config


def table_rows(cells: list[dict], tasks: list[str]) -> list[dict]:
    """One row per task and cell. The unpatched cell has no vtc report: its FLOPs are the unpatched estimate
    every patched cell carries (`avg_vtc_flops_unpatched`), its visual tokens those that come in."""
    patched = [c["throughput"] for c in cells if "avg_vtc_flops_unpatched" in c["throughput"]]
    base_flops = patched[0]["avg_vtc_flops_unpatched"] if patched else float("nan")
    visual_in = patched[0]["avg_vtc_visual_in"] if patched else float("nan")
    unpatched = next(c for c in cells if c["strategy"] == UNPATCHED)
    rows = []
    for task in tasks:
        reference = unpatched["results"][task]["score"]
        for c in cells:
            t = c["throughput"]
            is_base = c["strategy"] == UNPATCHED
            score = c["results"][task]["score"]
            rows.append({
                "task": task,
                "metric": c["results"][task]["metric"],
                "strategy": c["strategy"],
                "keep": "" if c["keep"] is None else c["keep"],
                "score": score,
                "relative": score / reference if reference else float("nan"),
                "llm_gflops": (base_flops if is_base else t.get("avg_vtc_flops", float("nan"))) / 1e9,
                "flops_ratio": 1.0 if is_base else t.get("avg_vtc_flops_ratio", float("nan")),
                "prefill_ms": c["prefill_ms"],
                "visual_pre_llm": visual_in if is_base else t.get("avg_vtc_visual_pre_llm", float("nan")),
                "visual_kept": visual_in if is_base else t.get("avg_vtc_visual_kept", float("nan")),
                "visual_in": visual_in,
            })  # fmt: skip
    return rows


def write_table(rows: list[dict], out: Path) -> None:
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = ["task", "strategy", "keep", "score", "relative", "LLM GFLOPs (est.)", "FLOPs ratio", "prefill ms"]
    lines = ["| " + " | ".join([*columns, "visual tokens: in / pre-LLM / last layer"]) + " |", "|" + " --- |" * 9]
    for r in rows:
        lines.append(
            f"| {r['task']} ({r['metric']}) | {r['strategy']} | {r['keep']} | {r['score']:.3f} | {r['relative']:.2f} "
            f"| {r['llm_gflops']:.4g} | {r['flops_ratio']:.2f} | {r['prefill_ms']:.1f} "
            f"| {r['visual_in']:.0f} / {r['visual_pre_llm']:.0f} / {r['visual_kept']:.0f} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, baselines=BASELINES) -> None:
    """Score vs estimated LLM GFLOPs per task: one line per strategy (over its keeps), baselines dashed, the
    unpatched model a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        for strategy in dict.fromkeys(r["strategy"] for r in mine):
            points = sorted((r["llm_gflops"], r["score"]) for r in mine if r["strategy"] == strategy)
            x, y = zip(*points)
            if strategy == UNPATCHED:
                ax.plot(x, y, "k*", markersize=12, label=UNPATCHED)
            else:
                ax.plot(x, y, "--" if strategy in baselines else "-", marker="o", label=strategy)
        ax.set_xlabel("estimated LLM prefill GFLOPs per sample")
        ax.set_ylabel(mine[0]["metric"])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
