"""`vtc bench` end to end on the tiny model: the table's token counts, FLOPs and roofline columns."""

import argparse

import pytest

from eval.bench import ideal_time, plot, run
from vtc.testing import tiny_llava


def test_bench_rows_and_plots(tmp_path):
    args = argparse.Namespace(
        model="tiny",
        strategies=["fastv", "vtc_cls"],
        keep=[1.0, 0.25],
        batch=[1],
        device="cpu",
        dtype="float32",
        repeats=1,
        warmup=0,
        new_tokens=3,
        peak_tflops=1.0,
        peak_gbps=1e6,  # compute-bound, so fewer tokens means a real ideal speedup
        out=str(tmp_path / "b"),
    )
    rows = run(args)
    assert [(r["strategy"], r["keep"]) for r in rows] == [
        ("fastv", 1.0),
        ("fastv", 0.25),
        ("vtc_cls", 1.0),
        ("vtc_cls", 0.25),
    ]
    by = {(r["strategy"], r["keep"]): r for r in rows}
    assert by["fastv", 0.25]["visual_per_layer"] == "36 36 9 9"
    assert by["vtc_cls", 0.25]["visual_last_layer"] == 9
    assert by["vtc_cls", 1.0]["flops_ratio"] == pytest.approx(1.0)
    assert by["vtc_cls", 1.0]["ideal_speedup"] == pytest.approx(1.0)
    assert by["vtc_cls", 0.25]["ideal_speedup"] > by["fastv", 0.25]["ideal_speedup"] > 1.0
    assert all(r["overhead"] > 0 and r["decode_tok_s"] > 0 and r["memory_bytes"] > 0 for r in rows)
    paths = plot(rows, tmp_path / "b")
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_roofline_is_compute_bound_for_long_sequences_and_memory_bound_for_short():
    config = tiny_llava().config.text_config
    peaks = (1e9, 1e9)  # FLOP/s, bytes/s
    weights = 10**6
    short, long = ideal_time(config, [1] * 4, weights, peaks), ideal_time(config, [4096] * 4, weights, peaks)
    assert short == pytest.approx(weights / 1e9)  # weights streamed once per layer dominate
    assert long > 100 * short


def test_accuracy_benchmark_scores_and_writes_learned_rows(tmp_path):
    from eval.accuracy import UNPATCHED, answers, prepare, score, write_outputs
    from vtc import data
    from vtc.testing import load_tiny_vlm

    model, processor = load_tiny_vlm()
    samples = data.make_scene_qa(4, data.HELDOUT_SEED)
    batches = prepare(processor, samples, batch_size=2)
    rows = []
    for name, strategy, keep in [(UNPATCHED, None, 1.0), ("none", "none", 1.0), ("quota", "quota", 0.5)]:
        words, flops = answers(model, processor, batches, strategy, keep, desc=name)
        assert len(words) == 4
        for group, (correct, total) in score(samples, words).items():
            rows.append({"strategy": name, "keep": keep, "group": group, "correct": correct, "total": total,
                         "accuracy": correct / total, "flops_ratio": flops})
    by = {(r["strategy"], r["group"]): r for r in rows}
    assert by["none", "all"]["correct"] == by[UNPATCHED, "all"]["correct"]  # keep-everything changes nothing
    assert by["quota", "all"]["flops_ratio"] < 1.0
    rows.append({**by["none", "all"], "strategy": "dyvte+weights", "keep": None})  # a learned-budget row
    write_outputs(rows, tmp_path, n=4)
    table = (tmp_path / "accuracy.md").read_text()
    assert "| dyvte+weights | learned |" in table and "| quota | 0.5 |" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
