"""Time QuoTA's frame scoring with the model itself (a VLM prefill per frame, the paper's way) and with an open_clip
model (`scorer="clip"`, one image-encoder pass per frame), in one run, on the same frames.

    make clip-setup && .venv-clip/bin/python eval/quota_clip_speed.py [--frames 16] [--repeats 3] [--real]
        [--real-frames 4] [--real-repeats 1]

1. End to end on the tiny Qwen2-VL (vtc.testing, random weights): a `--frames`-frame video (synthetic, 56 x 84 px),
   the patched forward with quota keep=0.5, scoring by the model itself, by the tiny random-weight CLIP
   (vtc.testing.clip) and by a random-weight ViT-B-32 CLIP (open_clip's config, no weights); the seconds are
   QuoTA's own scoring time (`strategy.last_scoring`: prompt building, frame rebuilding and the scorer passes).
2. `--real`: the scoring passes alone at real size, random weights: the llava-onevision-qwen2-0.5b architecture at
   full depth (vtc.testing.real_model, 24 decoder layers) scoring `--real-frames` frames of 14 x 14 pooled tokens
   with `frame_probabilities` (the features a prefill already has), against ViT-B-32 CLIP on the same number of
   384 px frames (`clip_scores`, its own vision pass included). CPU, fp32.

Each time is the median of the repeats after one warm-up round, the scorers timed in turn (a change of the
machine's load hits them alike). Writes eval/results/quota_clip_speed.{json,md}.
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


def interleaved_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, the callables run in turn (one warm-up round first), so that a change of
    the machine's load during the run hits them alike. A callable returning a number reports its own seconds."""
    times = {label: [] for label in runs}
    for round_ in range(repeats + 1):
        for label, run in runs.items():
            start = time.perf_counter()
            own = run()
            if round_:
                times[label].append(own if isinstance(own, float) else time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


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
    frames_scored = {}

    def scoring_seconds(label: str) -> float:
        """One patched forward; QuoTA's own scoring seconds (prompts, frame rebuilding, the scorer passes)."""
        with torch.no_grad(), vtc.patched(model, "quota", keep=0.5, processor=processor, **scorers[label]) as h:
            model(**inputs)
            frames_scored[label] = h.strategy.last_scoring["frames"]
            return float(h.strategy.last_scoring["seconds"])

    seconds = interleaved_seconds({label: lambda label=label: scoring_seconds(label) for label in scorers}, repeats)
    base = seconds["the model itself"]
    return [
        dict(scorer=label, frames_scored=frames_scored[label], scoring_s=s, scoring_vs_vlm=s / base)
        for label, s in seconds.items()
    ]


def real_size(frames: int, repeats: int) -> list[dict]:
    from PIL import Image

    from vtc.testing import real_model

    name = "llava-onevision-qwen2-0.5b"
    model, processor = real_model(name, text_layers=None)
    strategy = QuoTA(keep=0.5, processor=processor)
    torch.manual_seed(0)
    features = torch.randn(frames, 14 * 14, model.config.text_config.hidden_size) * 0.02
    prompt = QUERY_PROMPT.format(query="What happens in the video?")
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
    vlm_label = f"{name} (full depth, random weights), frame_probabilities"
    clip_label = "ViT-B-32 CLIP (random weights), clip_scores"
    seconds = interleaved_seconds(
        {
            vlm_label: lambda: strategy.frame_probabilities(model, features, (14, 14), prompt),
            clip_label: lambda: clip.clip_scores(images, "What happens in the video?"),
        },
        repeats,
    )
    return [
        dict(scorer=label, frames_scored=frames, scoring_s=s, scoring_vs_vlm=s / seconds[vlm_label])
        for label, s in seconds.items()
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
        f" on {result['machine']}; median of the repeats after a warm-up round, scorers timed in turn; "
        "ratios from one run.",
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
