"""lmms-eval at scale: the local tiny model ids, data-parallel runs (several processes), dispatched models.

Skipped when lmms-eval is not installed (`make eval-setup` installs it). Offline: tiny models, local task files."""

from __future__ import annotations

import glob
import json
import re
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from vtc.integrations.lmms_eval import VTCModel  # noqa: E402

from .test_lmms_eval import TASKS, _docs, _request, _task_utils, run_lmms_eval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_VLM = ROOT / "assets" / "tiny_vlm" / "model.safetensors"


@pytest.mark.parametrize(
    ("name", "model_class", "processor_class"),
    [
        ("vtc-tiny-qwen2-vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
        ("vtc-tiny-onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"),
        ("vtc-tiny-internvl", "InternVLForConditionalGeneration", "InternVLProcessor"),
    ],
)
def test_tiny_model_ids(name, model_class, processor_class):
    """Each local tiny id loads the family's model and real processor class; the plug-in's prompt and images reach
    the model (the unpatched loglikelihood is the model's own continuation loss) and a strategy patches it."""
    import transformers

    utils = _task_utils()
    doc = _docs()[1]
    lm = VTCModel(pretrained=name, device="cpu")
    lm.task_dict = {"t": {"test": _docs()}}
    assert type(lm.model).__name__ == model_class
    assert isinstance(lm.processor, getattr(transformers, processor_class))
    context, continuation = utils.doc_to_text(doc), " square"
    (result,) = lm.loglikelihood(
        [_request("loglikelihood", (context, continuation, utils.doc_to_visual, 1, "t", "test"), 1)]
    )
    prompt = lm._prompt(context, 1)
    n = len(lm.tokenizer(prompt + continuation)["input_ids"]) - len(lm.tokenizer(prompt)["input_ids"])
    inputs = lm._inputs([prompt + continuation], [utils.doc_to_visual(doc)])
    assert int((inputs["input_ids"] == lm.model.config.image_token_id).sum()) > 0
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -n:] = inputs["input_ids"][:, -n:]
    with torch.no_grad():
        loss = lm.model(**inputs, labels=labels).loss
    assert abs(result.text[0] - float(loss)) < 1e-4

    patched = VTCModel(pretrained=name, device="cpu", strategy="fastv", keep=0.25)
    patched.task_dict = lm.task_dict
    patched.loglikelihood([_request("loglikelihood", (context, continuation, utils.doc_to_visual, 1, "t", "test"), 1)])
    assert patched.vtc_summary()["vtc_keep_ratio"] == pytest.approx(0.25, abs=0.04)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lmms_eval(tmp_path: Path, name: str, launcher: list[str], model_args: str, *extra: str) -> tuple[dict, str, float]:
    """Run the lmms-eval CLI (after `launcher`) on the local tasks: (results file, log, wall seconds)."""
    started = time.perf_counter()
    results, log, out = run_lmms_eval(
        tmp_path / name, model_args, "vtc_scene_qa,vtc_scene_qa_mc", "--log_samples", *extra, launcher=launcher
    )
    seconds = time.perf_counter() - started
    samples = {}
    for task in ("vtc_scene_qa", "vtc_scene_qa_mc"):
        (samples_file,) = glob.glob(str(out / f"*_samples_{task}.jsonl"))
        rows = [json.loads(line) for line in Path(samples_file).read_text().splitlines() if line]
        samples[task] = {row["doc_id"]: row["filtered_resps"] for row in rows}
    results["vtc_samples_by_doc"] = samples
    return results, log, seconds


@pytest.mark.skipif(not TINY_VLM.is_file(), reason="trained tiny VLM not built")
def test_data_parallel_equals_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (on CPU: torchrun, a gloo group) gives the one-process
    metrics and answers; each process runs its half of the requests (lmms-eval's padding request is not run: 7
    questions, 4 + 3); vtc's throughput numbers are summed over both processes."""
    model_args = "pretrained=vtc-tiny-vlm,strategy=fastv,keep=0.25"
    extra = ("--batch_size", "2", "--limit", "7", "--verbosity", "INFO")
    one, _, one_s = _lmms_eval(tmp_path, "one", [sys.executable], model_args, *extra)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]  # fmt: skip
    two, log, two_s = _lmms_eval(tmp_path, "two", launch, model_args, *extra)
    print(f"wall time: 1 process {one_s:.1f} s, 2 processes {two_s:.1f} s")

    for task, metric in [("vtc_scene_qa", "accuracy,none"), ("vtc_scene_qa_mc", "acc,none")]:
        assert two["results"][task][metric] == one["results"][task][metric]
        assert two["n-samples"][task]["effective"] == 7
    answers_one, answers_two = one["vtc_samples_by_doc"], two["vtc_samples_by_doc"]
    assert answers_two["vtc_scene_qa"] == answers_one["vtc_scene_qa"]  # generated text, per question
    assert sorted(answers_two["vtc_scene_qa"]) == list(range(7))
    for doc_id, choices in answers_one["vtc_scene_qa_mc"].items():  # loss per choice (other batch neighbours)
        got = answers_two["vtc_scene_qa_mc"][doc_id]
        assert [greedy for _, greedy in got] == [greedy for _, greedy in choices]
        torch.testing.assert_close(
            torch.tensor([float(v) for v, _ in got]), torch.tensor([float(v) for v, _ in choices]), atol=1e-4, rtol=0
        )

    lines = re.findall(r"vtc: process (\d) of 2 ran (\d+) requests", log)
    per_process = [[int(n) for p, n in lines if int(p) == k] for k in (0, 1)]  # one count per lmms-eval call
    assert len(per_process[0]) == len(per_process[1]) == 2  # loglikelihood and generate_until, on each process
    calls = {a + b: sorted([a, b]) for a, b in zip(*per_process)}
    assert calls[7] == [3, 4]  # generate_until: 7 questions
    choices = sum(len(doc["choices"]) for doc in _docs()[:7])  # loglikelihood: one request per choice
    assert calls[choices][0] > 0

    a, b = one["throughput"], two["throughput"]
    assert b["total_gen_tokens"] == a["total_gen_tokens"]
    for key in ("avg_vtc_visual_in", "avg_vtc_visual_kept", "avg_vtc_keep_ratio", "avg_vtc_flops_ratio"):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key


def test_vtc_eval_sweep(tmp_path, monkeypatch):
    """`vtc eval` (run_sweep): one loaded model, patched and unpatched between cells, gives each cell the results of a
    fresh plug-in model with that strategy; the table and plot are written; a rerun reruns no finished cell."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from vtc.integrations import sweep

    tasks = ["vtc_scene_qa_mc"]
    rows = sweep.run_sweep(
        "vtc-tiny", tasks, ["fastv"], [0.5], tmp_path, include_path=str(TASKS), batch_size=2, limit=3
    )
    assert [(r["strategy"], r["keep"]) for r in rows] == [
        ("unpatched", ""), ("random", 0.5), ("downsample", 0.5), ("fastv", 0.5)
    ]  # fmt: skip
    assert all((tmp_path / name).is_file() for name in ("sweep.csv", "sweep.md", "sweep.png"))
    by_strategy = {r["strategy"]: r for r in rows}
    assert by_strategy["unpatched"]["relative"] == 1.0 and by_strategy["unpatched"]["flops_ratio"] == 1.0
    assert by_strategy["unpatched"]["visual_kept"] == 36 and by_strategy["fastv"]["visual_kept"] == 18
    assert (
        by_strategy["random"]["llm_gflops"]
        < by_strategy["fastv"]["llm_gflops"]
        < by_strategy["unpatched"]["llm_gflops"]
    )

    task_manager = TaskManager(include_path=str(TASKS))
    # a fresh plug-in model with the cell's strategy gives the cell's score (the reused model was patched 3 times)
    fresh = VTCModel(pretrained="vtc-tiny", device="cpu", batch_size=2, strategy="fastv", keep=0.5)
    results = evaluator.simple_evaluate(
        model=fresh, tasks=tasks, batch_size=2, limit=3, task_manager=task_manager, verbosity="WARNING"
    )
    assert by_strategy["fastv"]["score"] == sweep.main_metric(results["results"]["vtc_scene_qa_mc"])[1]
    assert by_strategy["fastv"]["llm_gflops"] == pytest.approx(results["throughput"]["avg_vtc_flops"] / 1e9, rel=1e-9)

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(evaluator, "simple_evaluate", fail)
    again = sweep.run_sweep(
        "vtc-tiny", tasks, ["fastv"], [0.5], tmp_path, include_path=str(TASKS), batch_size=2, limit=3
    )
    assert [r["score"] for r in again] == [r["score"] for r in rows]
