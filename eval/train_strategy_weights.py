"""Train the learned parts of DyVTE, p-MoD and ATP on the tiny VLM (issue 5), with the VLM frozen.

    python eval/train_strategy_weights.py                       # all three, written to assets/tiny_vlm/strategies/
    python eval/train_strategy_weights.py --strategies dyvte --steps 50

Each strategy is trained by `vtc.train` on `vtc.data.make_scene_qa(n, TRAIN_STREAM)` (a training stream, never
the held-out seed) and saved as `<strategy>.safetensors`; `vtc.patch(model, strategy, weights=path)` loads it.
`eval/accuracy.py` evaluates these weights beside the training-free fallbacks. What is trained:

- dyvte: one router per decoder layer (exit labels from the paper's agreement/loss rule); lr 1e-3 (ours: the
  paper's 6e-5 needs far more steps than a CPU run affords);
- pmod: the routers of the paper's schedule (keep=None), on the answers' LM loss; lr 1e-3;
- atp: the threshold MLPs with soft masks and the budget loss towards keep=0.25; lr 3e-3.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vtc
from vtc import data
from vtc.testing import load_tiny_vlm, tiny_vlm_dir

TRAIN_STREAM = 7  # make_scene_qa seed of the training samples (the held-out split is data.HELDOUT_SEED)
SETTINGS = {  # strategy -> vtc.train keyword arguments (ours: small CPU runs on the tiny VLM)
    "dyvte": {"lr": 1e-3},
    "pmod": {"lr": 1e-3},
    "atp": {"lr": 3e-3, "keep": 0.25},
}


def weights_dir(model_dir: Path | None = None) -> Path:
    return (Path(model_dir) if model_dir else tiny_vlm_dir()) / "strategies"


def to_fp16(path: Path) -> None:
    """Rewrite a safetensors file in fp16 (half the size in the repo; loading casts back to the model's dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path, metadata=metadata)


def train_one(strategy: str, model_dir: Path | None, out_dir: Path, samples: list[dict], steps: int,
              batch_size: int, progress: bool = True) -> dict:
    """Train `strategy` on a fresh copy of the tiny VLM; returns a summary (losses at the ends, time, path)."""
    model, processor = load_tiny_vlm(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{strategy}.safetensors"
    started = time.time()
    result = vtc.train(model, strategy=strategy, data=samples, processor=processor, steps=steps,
                       batch_size=batch_size, save=path, progress=progress, **SETTINGS[strategy])
    to_fp16(path)
    losses = result.losses
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    return {"strategy": strategy, "steps": steps, "batch_size": batch_size, "settings": SETTINGS[strategy],
            "loss_first_tenth": sum(head) / len(head), "loss_last_tenth": sum(tail) / len(tail),
            "seconds": round(time.time() - started, 1), "file": path.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None, help="tiny VLM directory (default: assets/tiny_vlm)")
    parser.add_argument("--out", type=Path, default=None, help="default: <model>/strategies")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_dir = args.out or weights_dir(args.model)
    samples = data.make_scene_qa(args.steps * args.batch_size, TRAIN_STREAM)
    summaries = []
    for strategy in args.strategies:
        summary = train_one(strategy, args.model, out_dir, samples, args.steps, args.batch_size)
        print(json.dumps(summary))
        summaries.append(summary)
    log = out_dir / "train_summary.json"
    previous = json.loads(log.read_text()) if log.exists() else {}
    log.write_text(json.dumps({**previous, **{s["strategy"]: s for s in summaries}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
