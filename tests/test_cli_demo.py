"""`vtc demo`: measured timings on the tiny model beside the estimate for the full llava-1.5-7b architecture."""

import pytest

from vtc.budget import prefill_flops
from vtc.cli import main, real_size_ratio
from vtc.testing.real import real_config


def test_real_size_estimate_follows_each_strategys_schedule():
    assert real_size_ratio("none", 0.25, 40) == 1.0
    pre_llm = {name: real_size_ratio(name, 0.25, 40) for name in ("vtc_cls", "fopru", "visionzip", "random")}
    assert len(set(pre_llm.values())) == 1  # the same tokens in every decoder layer
    # LLM part of the ratio: 40 text + 144 of 576 visual tokens in all 32 layers
    text = real_config("llava-1.5-7b", text_layers=None).text_config
    llm_only = prefill_flops(text, [184] * 32) / prefill_flops(text, [616] * 32)
    assert llm_only < pre_llm["vtc_cls"] < llm_only + 0.05  # plus the unchanged vision tower (a few %)
    assert pre_llm["vtc_cls"] < real_size_ratio("fastv", 0.25, 40) < 1.0  # FastV drops after layer 2
    assert real_size_ratio("todre", 0.25, 40) < pre_llm["vtc_cls"]  # stage 2 drops more from L/2
    assert real_size_ratio("vtc_cls", 0.1, 40) < pre_llm["vtc_cls"] < real_size_ratio("vtc_cls", 0.5, 40)
    assert real_size_ratio("dyvte", 0.25, 40) is None  # set by trained routers, not by keep


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_prints_measured_and_estimated_columns(tmp_path, capsys):
    assert main(["demo", "--strategy", "vtc_cls", "fastv", "--out", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    assert "at 7B (est.)" in out and "NOT measured" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("vtc_cls ", "fastv "))]
    estimate = {row[0]: row[5] for row in rows}
    assert estimate["vtc_cls"].endswith("x") and float(estimate["vtc_cls"][:-1]) < float(estimate["fastv"][:-1]) < 1
    assert (tmp_path / "demo.png").exists()
