"""Regenerate this task's data: `python eval/lmms_tasks/vtc_scene_qa/make_data.py [--n 8]`.

Writes `scene_qa.jsonl` (one question per line) and `images/NNN.jpg` (224x224 scenes, JPEG quality 90) next to
this file, from the held-out split of `vtc.data` (`make_scene_qa(n, HELDOUT_SEED)`), so the tiny VLM trained on
that task (`pretrained=vtc-tiny-vlm`) can be scored on pictures it never saw. Deterministic: the same n gives the
same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtc import data

HERE = Path(__file__).resolve().parent

CHOICES = {
    "colour": list(data.COLOURS),
    "shape": list(data.SHAPES),
    "count": list(data.NUMBERS[1 : data.MAX_OBJECTS + 1]),
    "presence": ["yes", "no"],
    "position": list(data.POSITIONS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="questions to write (default 8)")
    args = parser.parse_args()
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    for old in images.glob("*.*"):
        old.unlink()
    lines = []
    for i, sample in enumerate(data.make_scene_qa(args.n, data.HELDOUT_SEED)):
        name = f"images/{i:03d}.jpg"
        sample["image"].save(HERE / name, quality=90)  # JPEG: the noisy backgrounds make PNGs ~100 KB
        record = {
            "id": i,
            "image": name,
            "question": sample["question"],
            "answer": sample["answer"],
            "kind": sample["kind"],
            "small": bool(sample["small"]),
            "choices": CHOICES[sample["kind"]],
        }
        lines.append(json.dumps(record))
    (HERE / "scene_qa.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} questions to {HERE / 'scene_qa.jsonl'}")


if __name__ == "__main__":
    main()
