"""Keep notebooks in git without outputs.

    python notebooks/strip_outputs.py            # strip outputs, execution counts and widget state in place
    python notebooks/strip_outputs.py --check    # exit 1 and name the notebooks that still carry outputs

Paths default to every notebook in this folder. tests/test_notebooks.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOLATILE_METADATA = ("widgets", "execution")
"""Notebook- and cell-level metadata that running a notebook adds."""


def strip(nb: dict) -> bool:
    """Remove outputs, execution counts and run metadata from a notebook dict in place; True if it changed."""
    changed = False
    for key in VOLATILE_METADATA:
        changed |= nb.get("metadata", {}).pop(key, None) is not None
    for cell in nb.get("cells", []):
        for key in VOLATILE_METADATA:
            changed |= cell.get("metadata", {}).pop(key, None) is not None
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            cell["outputs"] = []
            changed = True
        if cell.get("execution_count") is not None:
            cell["execution_count"] = None
            changed = True
    return changed


def is_stripped(nb: dict) -> bool:
    """True when the notebook carries no outputs, execution counts or run metadata."""
    return not strip(json.loads(json.dumps(nb)))


def notebooks(paths: list[str | Path] | None = None) -> list[Path]:
    return sorted(Path(p) for p in paths) if paths else sorted(HERE.glob("*.ipynb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="report notebooks with outputs, change nothing")
    args = parser.parse_args(argv)
    dirty = []
    for path in notebooks(args.paths):
        nb = json.loads(path.read_text(encoding="utf-8"))
        if args.check:
            if not is_stripped(nb):
                dirty.append(path)
        elif strip(nb):
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"stripped {path}")
    if dirty:
        print("notebooks with outputs (run python notebooks/strip_outputs.py):", *dirty, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
