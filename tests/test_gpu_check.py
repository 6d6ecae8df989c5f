"""eval/gpu_check.sh --cpu-smoke: the GPU check's every step on tiny models on the CPU, so the script never rots.
Timings here mean nothing; the files, the index equality of the kernels and the rows do."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "eval" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    assert set(thresholds) == {"cosine", "kcenter", "bipartite", "duplication"}
    assert all(t["index_mismatches"] == 0 and t["cases"] > 0 for t in thresholds.values())
    for model in ("tiny", "tiny-qwen2_5-vl"):
        rows = json.loads((tmp_path / f"bench_{model}.json").read_text())
        assert {r["strategy"] for r in rows} == {"vtc_cls", "visionzip", "fastv", "todre", "dart"}
        measured = [r for r in rows if not r["note"]]
        assert measured and all(r["ttft_ms"] > 0 and r["visual_in"] > 0 for r in measured)
        assert all(r["overhead"] is not None for r in measured if r["batch"] == 1)
    sdpa = json.loads((tmp_path / "sdpa.json").read_text())
    assert all(row["vtc_backends"] and row["unpatched_backends"] for row in sdpa["rows"])
    assert "tiny" in (tmp_path / "summary.md").read_text()
