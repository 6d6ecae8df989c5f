"""Time QuoTA's frame scoring with the model itself (a VLM prefill per frame, the paper's way) and with an open_clip
model (`scorer="clip"`, one image-encoder pass per frame), in one run, on the same frames.

    make clip-setup && .venv-clip/bin/python eval/quota_clip_speed.py [--frames 16] [--repeats 3] [--real]
        [--real-frames 4] [--real-repeats 1]

1. End to end on the tiny Qwen2-VL (vtc.testing, random weights): a `--frames`-frame video (synthetic, 56 x 84 px),
   the patched forward with quota keep=0.5, scoring by the model itself, by the tiny random-weight CLIP
   (vtc.testing.clip) and by a random-weight ViT-B-32 CLIP (open_clip's config, no weights); the seconds are
   QuoTA's own scoring time (`strategy.last_scoring`: prompt building, frame rebuilding and the scorer passes).
2. `--real`: the scoring passes alone at real size, random weights: the llava-onevision-qwen2-0.5b architecture at
   full depth (vtc.testing.real_model, 24 decoder layers) scoring `--real-frames` frames of 14 x 14 pooled tokens with
   `frame_probabilities` (the features a prefill already has), against ViT-B-32 CLIP on the same number of
   384 px frames (`clip_scores`). CPU, fp32.

Each time is the median of the repeats after one warm-up. Writes eval/results/quota_clip_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vtc  # noqa: E402
from vtc.strategies.quota import QUERY_PROMPT, QuoTA  # noqa: E402
from vtc.testing.clip import tiny_open_clip  # noqa: E402
from vtc.testing.qwen2_vl import make_video, qwen_inputs, tiny_qwen_processor, tiny_qwen_vl  # noqa: E402


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def end_to_end(frames: int, repeats: int) -> list[dict]:
    model, processor = tiny_qwen_vl("qwen2_vl", seed=0), tiny_qwen_processor()
    inputs = qwen_inputs(
        processor, ["What happens in the video?"], videos=[[make_video(0, frames=frames, size=(56, 84))]]
    )
    scorers = {"the model itself": {}}
    for label, name in (("tiny CLIP (vtc.testing.clip)", "vtc-tiny-clip"), ("ViT-B-32 CLIP, random", "ViT-B-32")):
        clip_model, tokenizer, preprocess = tiny_open_clip(seed=0, name=name)
        scorers[label] = dict(
            scorer="clip", clip_model=clip_model, clip_tokenizer=tokenizer, clip_preprocess=preprocess
        )
    rows = []
    for label, options in scorers.items():
        with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor, **options) as handle:
            scoring = []

            def run(scoring=scoring, handle=handle):
                model(**inputs)
                scoring.append(handle.strategy.last_scoring)

            prefill = median_seconds(run, repeats)
            seconds = statistics.median(s["seconds"] for s in scoring[1:])
            rows.append(
                dict(
                    scorer=label,
                    frames_scored=scoring[-1]["frames"],
                    scoring_s=seconds,
                    forward_s=prefill,
                    budgets=[p["budget"] for p in handle.strategy.last_plan],
                )
            )
    base = rows[0]["scoring_s"]
    for row in rows:
        row["scoring_vs_vlm"] = row["scoring_s"] / base
    return rows


def real_size(frames: int, repeats: int) -> list[dict]:
    from PIL import Image

    from vtc.testing import real_model

    name = "llava-onevision-qwen2-0.5b"
    model, processor = real_model(name, text_layers=None)
    strategy = QuoTA(keep=0.5, processor=processor)
    torch.manual_seed(0)
    features = torch.randn(frames, 14 * 14, model.config.text_config.hidden_size) * 0.02
    prompt = QUERY_PROMPT.format(query="What happens in the video?")
    vlm = median_seconds(lambda: strategy.frame_probabilities(model, features, (14, 14), prompt), repeats)
    clip_model, tokenizer, preprocess = tiny_open_clip(seed=0, name="ViT-B-32")
    clip = QuoTA(
        keep=0.5,
        processor=processor,
        scorer="clip",
        clip_model=clip_model,
        clip_tokenizer=tokenizer,
        clip_preprocess=preprocess,
    )
    images = [Image.new("RGB", (384, 384), (40 * i % 255, 90, 160)) for i in range(frames)]
    seconds = median_seconds(lambda: clip.clip_scores(images, "What happens in the video?"), repeats)
    return [
        dict(
            scorer=f"{name} (full depth, random weights), frame_probabilities",
            frames_scored=frames,
            scoring_s=vlm,
            scoring_vs_vlm=1.0,
        ),
        dict(
            scorer="ViT-B-32 CLIP (random weights), clip_scores",
            frames_scored=frames,
            scoring_s=seconds,
            scoring_vs_vlm=seconds / vlm,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also time the scoring passes at real size")
    parser.add_argument("--real-frames", type=int, default=4, help="frames scored at real size (default 4)")
    parser.add_argument("--real-repeats", type=int, default=1, help="repeats at real size (default 1)")
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "quota_clip_speed"))
    args = parser.parse_args()
    result = dict(
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        frames=args.frames,
        repeats=args.repeats,
        end_to_end=end_to_end(args.frames, args.repeats),
    )
    if args.real:
        result["real_size"] = real_size(args.real_frames, args.real_repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    real = f" --real --real-frames {args.real_frames} --real-repeats {args.real_repeats}" if args.real else ""
    lines = [
        '# QuoTA frame scoring: the model itself vs open_clip (`scorer="clip"`)',
        "",
        f"`eval/quota_clip_speed.py --frames {args.frames} --repeats {args.repeats}{real}`"
        f" on {result['machine']}; median of the repeats after a warm-up; ratios from one run.",
        "",
    ]
    for part, title in (
        ("end_to_end", "tiny Qwen2-VL, quota keep=0.5, QuoTA's scoring time in the forward"),
        ("real_size", "real size, the scoring passes alone"),
    ):
        if part not in result:
            continue
        lines += [f"## {title}", "", "| scorer | frames | scoring s | vs the VLM |", "|---|---:|---:|---:|"]
        for row in result[part]:
            lines.append(
                f"| {row['scorer']} | {row['frames_scored']} | {row['scoring_s']:.4f} | {row['scoring_vs_vlm']:.3f}x |"
            )
        lines.append("")
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
