"""How far DART's defaults are from the official selection rule, on the trained tiny VLM.

    python eval/dart_fidelity.py --n 40

For `--n` held-out scene questions (batch 1, each `--keep`, layer 2), the Jaccard index between the tokens our
default DART keeps and those kept with `budget="official"`, `pivot_order="official"`, or both (the official
rule), and the kept counts. Prints a small table; the numbers are quoted in vtc/strategies/dart.py.
"""

from __future__ import annotations

import argparse

import torch

import vtc
from vtc import data
from vtc.testing import load_tiny_vlm


def kept_sets(model, batches, options: dict) -> list[set[int]]:
    out = []
    with torch.no_grad(), vtc.patched(model, "dart", **options) as handle:
        for inputs in batches:
            model(**inputs)
            out.append(set(handle.last_kept("final")[0].tolist()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--keep", type=float, nargs="+", default=[128 / 576, 0.25, 0.1])
    args = parser.parse_args()
    model, processor = load_tiny_vlm()
    batches = []
    for s in data.make_scene_qa(args.n, data.HELDOUT_SEED):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        batches.append(processor(images=[s["image"]], text=[text], return_tensors="pt"))
    for keep in args.keep:
        ours = kept_sets(model, batches, {"keep": keep})
        print(f"keep {keep:.3f}: default keeps {len(ours[0])} of 196")
        for name, options in [("budget=official", dict(budget="official")),
                              ("pivot_order=official", dict(pivot_order="official")),
                              ("both (official rule)", dict(budget="official", pivot_order="official"))]:
            other = kept_sets(model, batches, {"keep": keep, **options})
            jaccard = torch.tensor([len(a & b) / len(a | b) for a, b in zip(ours, other)])
            print(f"  {name:22s} keeps {len(other[0])}, Jaccard with default: mean {jaccard.mean():.3f}, "
                  f"min {jaccard.min():.3f}, max {jaccard.max():.3f}")

if __name__ == "__main__":
    main()
