"""Similarity kernels: Triton implementations next to their PyTorch references.

- :mod:`vtc.kernels.reference`   pure-torch references (always importable; what runs on CPU)
- :mod:`vtc.kernels.cosine`      fused pairwise cosine (+ the shared ``dot_tile`` helper)
- :mod:`vtc.kernels.bipartite`   fused row max + argmax of cos(A, B) for ToMe matching
- :mod:`vtc.kernels.kcenter`     fused greedy k-center, one program per batch row
- :mod:`vtc.kernels.duplication` DART pivot-vs-token similarities with fused pivot gather

The Triton modules import ``triton`` at import time; nothing in this package imports them eagerly,
so ``import vtc.ops`` works without triton. Use the public entry points in :mod:`vtc.ops`.

Running the Triton kernels on CPU tensors needs the Triton interpreter: ``TRITON_INTERPRET=1`` must
be in the environment when a Triton module of this package is FIRST imported (``triton.jit``
decides compiled vs. interpreted at decoration time).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

TRITON_MODULES = ("cosine", "bipartite", "kcenter", "duplication")


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (it is not imported)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value in the environment right now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def load(name: str) -> ModuleType:
    """Import (once) and return the Triton kernel module ``vtc.kernels.<name>``."""
    if name not in TRITON_MODULES:
        raise ValueError(f"unknown kernel module {name!r}; expected one of {TRITON_MODULES}")
    return importlib.import_module(f"{__name__}.{name}")
