"""The README's self-contained Python examples run as written (each in a fresh interpreter, offline).

A block is self-contained when it starts with an import and defines every model it uses; the others (the
one-line teasers that assume a `model` of yours) are skipped by that rule, not by name. A block that builds
its model with an extra's package (`vtc.testing.clip`: open_clip, in .venv-clip) is skipped where that package
is missing; tests/clip runs it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def self_contained(code: str) -> bool:
    starts_with_import = code.lstrip().startswith(("import ", "from "))
    uses_model = re.search(r"\bmodel\b", code) is not None
    defines_model = re.search(r"^\s*model\b[^=\n]*=", code, re.M) is not None
    return starts_with_import and (defines_model or not uses_model)


RUNNABLE = [code for code in BLOCKS if self_contained(code)]


def test_the_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 5, f"only {len(RUNNABLE)} self-contained examples found in README.md"


@pytest.mark.parametrize("code", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(code, tmp_path):
    if "vtc.testing.clip" in code:
        pytest.importorskip("open_clip", reason="the `clip` extra (make clip-setup); tests/clip runs this block")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README example failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
