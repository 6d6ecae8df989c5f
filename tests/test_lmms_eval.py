"""The lmms-eval plug-in (vtc/integrations/lmms_eval.py) and the local task in eval/lmms_tasks.

Skipped when lmms-eval is not installed (`make eval-setup` installs it). Offline: tiny models, local task files."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance  # noqa: E402

from vtc.integrations.lmms_eval import VTCModel, parse_value  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "lmms_tasks"


def run_lmms_eval(tmp_path: Path, model_args: str, tasks: str, *extra: str, launcher=None) -> tuple[dict, str, Path]:
    """The lmms-eval CLI on local tasks, offline: the `lmms-eval` console script (found through vtc's entry point),
    or `launcher + ["-m", "lmms_eval"]`. Asserts a clean exit and one results file (lmms-eval prints an evaluation
    error and still exits 0); returns (results, log, the run's output folder)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("lmms-eval")
    if launcher is not None:
        command = [*launcher, "-m", "lmms_eval"]
    else:
        command = [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]
    command += [
        "--model", "vtc",
        "--model_args", model_args,
        "--tasks", tasks,
        "--include_path", str(TASKS),
        "--output_path", str(out),
        *extra,
    ]  # fmt: skip
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
        LMMS_EVAL_DATASETS_CACHE=str(tmp_path / "datasets"),
    )
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    found = glob.glob(str(out / "*" / "*_results.json"))
    assert len(found) == 1, f"results files {found}\n{log[-4000:]}"
    return json.loads(Path(found[0]).read_text()), log, Path(found[0]).parent
TASK_DIR = TASKS / "vtc_scene_qa"


def _task_utils():
    spec = importlib.util.spec_from_file_location("vtc_scene_qa_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "scene_qa.jsonl").read_text().splitlines() if line]


def _request(kind: str, arguments: tuple, doc_id: int) -> Instance:
    return Instance(
        request_type=kind, arguments=arguments, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1}
    )


def _model(**kwargs) -> VTCModel:
    lm = VTCModel(pretrained="vtc-tiny", device="cpu", **kwargs)
    lm.task_dict = {"t": {"test": _docs()}}
    return lm


def test_parse_value():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.25") == 0.25 and parse_value("1.0") == 1.0 and isinstance(parse_value("1.0"), float)
    assert parse_value("-1") == -1 and parse_value("True") is True and parse_value("false") is False
    assert parse_value("none") is None and parse_value("fastv") == "fastv"
    assert parse_value('{"window": 16}') == {"window": 16}
    assert parse_value(2) == 2


def test_entry_point_resolves_to_the_model_class():
    names = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert names.get("vtc") == "vtc.integrations:lmms_eval_models", "run `make eval-setup` (or pip install -e .)"
    from lmms_eval.models import get_model

    assert get_model("vtc") is VTCModel
    assert get_model("vtc_hf") is VTCModel


def test_model_args_reach_vtc():
    lm = VTCModel.create_from_arg_string("pretrained=vtc-tiny,strategy=fastv,keep=0.25,layer=2", {"batch_size": "2"})
    assert lm.handle is not None and lm.handle.active and lm.batch_size == 2
    assert lm.handle.strategy.llm_layer == 2 and lm.handle.strategy.keep == 0.25
    with pytest.raises(ValueError, match="layer"):  # a strategy option the strategy rejects fails early
        VTCModel(pretrained="vtc-tiny", strategy="fastv", layer=99)
    with pytest.raises(ValueError, match="without a strategy"):
        VTCModel(pretrained="vtc-tiny", keep=0.5)


def test_strategy_none_patches_without_compression():
    """`strategy=none` is vtc's no-compression run (reported), not the unpatched baseline (strategy absent)."""
    utils = _task_utils()
    doc = _docs()[0]
    gen = {"max_new_tokens": 3, "temperature": 0, "until": ["\n"]}
    request = [_request("generate_until", (utils.doc_to_text(doc), dict(gen), utils.doc_to_visual, 0, "t", "test"), 0)]
    plain = _model()
    none = VTCModel.create_from_arg_string("pretrained=vtc-tiny,strategy=none", {"batch_size": "1"})
    none.task_dict = plain.task_dict
    assert plain.handle is None and none.handle is not None and none.handle.strategy.name == "none"
    assert none.generate_until(request) == plain.generate_until(request)
    summary = none.vtc_summary()
    assert summary["vtc_visual_in"] == summary["vtc_visual_kept"] == 36 and summary["vtc_keep_ratio"] == 1.0
    assert summary["vtc_flops_ratio"] == pytest.approx(1.0)


def test_batched_requests_match_one_at_a_time():
    """Left-padded batches of the patched model give what one request at a time gives (generate, loglikelihood)."""
    utils = _task_utils()
    docs = _docs()[:3]
    gen = {"max_new_tokens": 3, "temperature": 0, "until": ["\n"]}
    generate = [
        _request("generate_until", (utils.doc_to_text(d), dict(gen), utils.doc_to_visual, i, "t", "test"), i)
        for i, d in enumerate(docs)
    ]
    loglik = [
        _request("loglikelihood", (utils.doc_to_text(d), f" {c}", utils.doc_to_visual, i, "t", "test"), i)
        for i, d in enumerate(docs)
        for c in d["choices"][:2]
    ]
    batched = _model(batch_size=3, strategy="fastv", keep=0.25, layer=2)
    alone = _model(batch_size=1, strategy="fastv", keep=0.25, layer=2)
    assert batched.generate_until(generate) == alone.generate_until(generate)
    lb = [r.text for r in batched.loglikelihood(loglik)]
    la = [r.text for r in alone.loglikelihood(loglik)]
    assert [g for _, g in lb] == [g for _, g in la]
    torch.testing.assert_close(torch.tensor([v for v, _ in lb]), torch.tensor([v for v, _ in la]), atol=1e-4, rtol=0)
    summary = batched.vtc_summary()
    assert summary["vtc_visual_in"] == 36 and summary["vtc_visual_kept"] == 9  # 84 px / 14 px = 6x6 tokens
    assert summary["vtc_keep_ratio"] == 0.25 and 0 < summary["vtc_flops_ratio"] < 1


def test_loglikelihood_is_the_continuation_loss():
    """Unpatched: the value equals the model's own loss with labels on the continuation tokens only."""
    utils = _task_utils()
    doc = _docs()[0]
    lm = _model()
    context, continuation = utils.doc_to_text(doc), " yes"
    (result,) = lm.loglikelihood(
        [_request("loglikelihood", (context, continuation, utils.doc_to_visual, 0, "t", "test"), 0)]
    )
    prompt = lm._prompt(context, 1)
    n = len(lm.tokenizer(prompt + continuation)["input_ids"]) - len(lm.tokenizer(prompt)["input_ids"])
    inputs = lm._inputs([prompt + continuation], [utils.doc_to_visual(doc)])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -n:] = inputs["input_ids"][:, -n:]
    with torch.no_grad():
        loss = lm.model(**inputs, labels=labels).loss
    assert abs(result.text[0] - float(loss)) < 1e-4
    assert lm.handle is None and lm.vtc_summary() == {}  # no strategy: the model runs unpatched


def test_multi_round():
    utils = _task_utils()
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        done = round_idx >= 2
        return utils.doc_to_visual(doc), "and now?", done, list(previous_output), {"round": round_idx}

    lm = _model(strategy="fastv", keep=0.5)
    gen = {"max_new_tokens": 2, "until": ["\n"]}
    request = _request(
        "generate_until_multi_round", ("what ?", gen, utils.doc_to_visual, doc_to_text, 1, "t", "test"), 1
    )
    (rounds,) = lm.generate_until_multi_round([request])
    assert len(rounds) == 2 and all(isinstance(r, str) for r in rounds)
    assert [s[0] for s in seen] == [1, 2] and len(seen[0][1]) == 1 and seen[1][2] == {"round": 1}


def test_lmms_eval_cli_end_to_end(tmp_path):
    """`lmms-eval --model vtc` (found through the entry point) on the local task: results file, metrics, vtc numbers."""
    results, _, out = run_lmms_eval(
        tmp_path,
        "pretrained=vtc-tiny,strategy=fastv,keep=0.25,layer=2",
        "vtc_scene_qa,vtc_scene_qa_mc",
        "--batch_size", "4", "--log_samples", "--verbosity", "WARNING",
    )  # fmt: skip
    assert out.name == "vtc-tiny"

    generated, chosen = results["results"]["vtc_scene_qa"], results["results"]["vtc_scene_qa_mc"]
    assert 0.0 <= generated["accuracy,none"] <= 1.0 and 0.0 <= chosen["acc,none"] <= 1.0
    assert results["n-samples"]["vtc_scene_qa"]["effective"] == 8
    assert "strategy=fastv" in results["config"]["model_args"]
    vtc_numbers = results["throughput"]
    assert vtc_numbers["avg_vtc_visual_in"] == 36 and vtc_numbers["avg_vtc_visual_kept"] == 9
    assert vtc_numbers["avg_vtc_keep_ratio"] == 0.25 and 0 < vtc_numbers["avg_vtc_flops_ratio"] < 1

    (samples_file,) = glob.glob(str(out / "*_samples_vtc_scene_qa.jsonl"))
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines() if line]
    assert len(samples) == 8 and all(isinstance(s["filtered_resps"], str) for s in samples)
    assert sum(s["accuracy"] for s in samples) / 8 == pytest.approx(generated["accuracy,none"])


@pytest.mark.skipif(
    not (ROOT / "assets" / "tiny_vlm" / "model.safetensors").is_file(), reason="trained tiny VLM not built"
)
def test_trained_tiny_vlm_answers_with_words():
    utils = _task_utils()
    lm = VTCModel(pretrained="vtc-tiny-vlm", device="cpu", strategy="fastv", keep=0.5, batch_size=4)
    lm.task_dict = {"t": {"test": _docs()}}
    gen = {"max_new_tokens": 2, "until": ["\n"]}
    requests = [
        _request("generate_until", (utils.doc_to_text(d), dict(gen), utils.doc_to_visual, i, "t", "test"), i)
        for i, d in enumerate(_docs()[:4])
    ]
    answers = lm.generate_until(requests)
    assert len(answers) == 4 and all(a.strip() for a in answers)
    assert lm.vtc_summary()["vtc_keep_ratio"] == pytest.approx(0.5, abs=0.01)


VIDEO_TASK_DIR = TASKS / "vtc_video_qa"


def _video_docs() -> list[dict]:
    return [json.loads(line) for line in (VIDEO_TASK_DIR / "video_qa.jsonl").read_text().splitlines() if line]


def test_video_visuals_path_frames_and_array_give_the_same_inputs():
    """doc_to_visual may return a video path, a nested list of PIL frames or a (T, H, W, 3) array: the frames the
    processor receives are the decoded ones (vtc.video.load_video), and so are the model inputs."""
    from vtc.video import load_video

    lm = VTCModel(pretrained="vtc-tiny-qwen2-vl", device="cpu", max_frames=4)
    path = str(VIDEO_TASK_DIR / _video_docs()[0]["video"])
    clip = load_video(path, max_frames=4)
    assert clip.indices == [0, 2, 4, 6]
    prompt = lm._prompt("what colour is the moving object ?", 0, 1)
    reference = None
    for visuals in ([path], [clip.images()], [clip.frames]):
        images, videos = lm._split_visuals(visuals)
        assert images == [] and len(videos) == 1 and np.array_equal(videos[0].frames, clip.frames)
        inputs = lm._inputs([prompt], [images], [videos])
        if reference is None:
            reference = inputs
            assert int((inputs["input_ids"] == lm.model.config.video_token_id).sum()) == 2 * 4 * 4
        else:
            assert all(torch.equal(inputs[k], reference[k]) for k in reference)
    with pytest.raises(NotImplementedError, match="videos"):
        lm._split_visuals([42])
    image_model = _model()
    with pytest.raises(ValueError, match="takes no video"):
        image_model._inputs([image_model._prompt("what ?", 0, 1)], [[]], [[clip]])


@pytest.mark.parametrize("name", ["vtc-tiny-qwen2-vl", "vtc-tiny-onevision"])
def test_video_generation_equals_the_model_on_the_processor_inputs(name):
    """An unpatched video request generates what the model generates on the processor's own video inputs, and a
    batch of video and image requests answers each as alone; QuoTA keeps at most half the video tokens."""
    from vtc.video import ensure_video_processor, load_video

    utils = _task_utils()
    docs = _video_docs()
    lm = VTCModel(pretrained=name, device="cpu", batch_size=4, max_frames=4)
    lm.task_dict = {"t": {"test": docs}, "img": {"test": _docs()}}
    video_utils_spec = importlib.util.spec_from_file_location("vtc_video_qa_utils", VIDEO_TASK_DIR / "utils.py")
    video_utils = importlib.util.module_from_spec(video_utils_spec)
    video_utils_spec.loader.exec_module(video_utils)
    gen = {"max_new_tokens": 3}
    requests = [
        _request("generate_until", (d["question"], dict(gen), video_utils.doc_to_visual, i, "t", "test"), i)
        for i, d in enumerate(docs[:3])
    ] + [_request("generate_until", (_docs()[0]["question"], dict(gen), utils.doc_to_visual, 0, "img", "test"), 0)]
    answers = lm.generate_until(requests)

    processor = ensure_video_processor(lm.processor)
    for i, d in enumerate(docs[:3]):
        clip = load_video(VIDEO_TASK_DIR / d["video"], max_frames=4)
        content = [{"type": "video"}, {"type": "text", "text": d["question"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[text], videos=[clip.frames], return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        expected = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert answers[i] == expected
    (alone,) = lm.generate_until(requests[3:])
    assert answers[3] == alone

    patched = VTCModel(pretrained=name, device="cpu", strategy="quota", keep=0.5, max_frames=4)
    patched.task_dict = lm.task_dict
    patched.generate_until(requests[:2])
    summary = patched.vtc_summary()
    assert summary["vtc_samples"] == 2 and 0 < summary["vtc_visual_kept"] <= summary["vtc_visual_in"] / 2


@pytest.mark.parametrize(
    "model_args", ["pretrained=vtc-tiny-qwen2-vl,strategy=quota,keep=0.5", "pretrained=vtc-tiny-onevision"]
)
def test_lmms_eval_cli_video_task(tmp_path, model_args):
    """`lmms-eval --model vtc` on the local video task and the image task in one run, offline."""
    results, _, _ = run_lmms_eval(
        tmp_path, model_args, "vtc_video_qa,vtc_scene_qa", "--batch_size", "4", "--limit", "4", "--verbosity", "WARNING"
    )
    assert 0.0 <= results["results"]["vtc_video_qa"]["accuracy,none"] <= 1.0
    assert results["n-samples"]["vtc_video_qa"]["effective"] == 4
    assert results["n-samples"]["vtc_scene_qa"]["effective"] == 4
    if "strategy=quota" in model_args:
        numbers = results["throughput"]
        assert 0 < numbers["avg_vtc_keep_ratio"] <= 0.5 and 0 < numbers["avg_vtc_flops_ratio"] < 1
