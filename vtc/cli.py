"""`vtc demo | bench | list | eval`."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_STRATEGIES = ("vtc_cls", "fopru", "fastv")
DEFAULT_QUESTION = "What colour is the circle?"
DEFAULT_VIDEO_STRATEGIES = ("quota", "downsample", "fastv")
DEFAULT_VIDEO_QUESTION = "Which shape moves?"


def _load_default_model(random_model: bool):
    """The embedded default: the tiny VLM trained here when its weights ship, else a random tiny LLaVA."""
    from . import testing

    if not random_model and hasattr(testing, "load_tiny_vlm"):
        try:
            model, processor = testing.load_tiny_vlm()
            return model, processor, "tiny VLM trained on synthetic scenes (assets/tiny_vlm)"
        except FileNotFoundError:
            pass
    return testing.tiny_llava(), testing.tiny_llava_processor(), "random-weight tiny LLaVA (vtc.testing.tiny_llava)"


def _load_default_video_model(random_model: bool):
    """The embedded video default: the tiny Qwen2-VL trained here on moving-shapes clips when its weights ship,
    else the image default (frames as images)."""
    if not random_model:
        from .testing.qwen2_vl import load_tiny_video_vlm

        try:
            model, processor = load_tiny_video_vlm()
            return model, processor, "tiny video VLM trained on moving-shapes clips (assets/tiny_video_vlm)"
        except FileNotFoundError:
            pass
    return _load_default_model(random_model)


def _prefill_ms(model, inputs, repeats: int = 3) -> float:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


# the strategies whose token schedules follow from `keep` and the layer count alone (pre-LLM selections of a
# fraction of each image, drops at fixed decoder layers); the others' depend on trained weights or the input
_SCHEDULED = ("vtc_cls", "fopru", "visionzip", "tome", "random", "downsample", "fastv", "dart", "todre")


def real_size_ratio(strategy: str, keep: float, n_text: int) -> float | None:
    """Estimated prefill time vs unpatched of `strategy` at `keep` on the full llava-1.5-7b architecture
    (576 visual tokens, CLIP-L/336 up to its feature layer + 32 x 4096 Llama layers; time taken proportional
    to FLOPs), for a prompt of `n_text` text tokens; None when the strategy's schedule is not set by `keep`."""
    import warnings

    from .budget import prefill_flops
    from .strategies.base import build_strategy, get_strategy_class
    from .testing.real import real_config

    name = get_strategy_class(strategy).name
    if name == "none":
        return 1.0
    if name not in _SCHEDULED:
        return None
    config = real_config("llava-1.5-7b", text_layers=None)
    text, vision = config.text_config, config.vision_config
    n_visual = (vision.image_size // vision.patch_size) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = build_strategy(strategy, keep, {})
    layers = text.num_hidden_layers
    visual = plan.stage_budget(n_visual, n_visual, "pre_llm") if plan.has_pre_llm else n_visual
    prune = set(plan.prune_layers(layers))
    tokens = []
    for layer in range(layers):
        if layer in prune:
            visual = plan.stage_budget(n_visual, visual, layer)
        tokens.append(n_text + visual)
    # the CLIP tower: MLP of 2 matrices, full attention over its n + 1 tokens, up to the feature layer (-2)
    n, d = n_visual + 1, vision.hidden_size
    vision_layer = 2.0 * n * (4 * d * d + 2 * d * vision.intermediate_size) + 4.0 * n * n * d
    vision_flops = (vision.num_hidden_layers + 1 + config.vision_feature_layer) * vision_layer
    full = vision_flops + prefill_flops(text, [n_text + n_visual] * layers)
    return (vision_flops + prefill_flops(text, tokens)) / full


def _answer(model, processor, inputs) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def demo(args) -> int:
    if args.video:
        return demo_video(args)
    args.keep = 0.25 if args.keep is None else args.keep
    args.strategy = args.strategy or list(DEFAULT_STRATEGIES)
    import torch
    from PIL import Image

    import vtc
    from vtc.testing import llava_inputs
    from vtc.viz import overlay_kept, side_by_side

    torch.manual_seed(0)
    model, processor, model_name = _load_default_model(args.random_model)
    trained = "trained" in model_name
    expected = None
    if args.image:
        image, source, question = Image.open(args.image).convert("RGB"), args.image, args.question
    elif trained:  # a held-out scene of the task the model was trained on, with its question
        from vtc.data import HELDOUT_SEED, make_scene_qa

        sample = make_scene_qa(args.sample + 1, HELDOUT_SEED)[args.sample]
        image, source, question = sample["image"], f"vtc.data held-out scene {args.sample}", sample["question"]
        question, expected = (args.question if args.question != DEFAULT_QUESTION else question), sample["answer"]
    else:
        image, source, question = Image.open(ASSETS / "demo.png").convert("RGB"), ASSETS / "demo.png", args.question
    inputs = llava_inputs(processor, [question], [[image]])
    size = model.config.vision_config.image_size
    print(f"model: {model_name}\nimage: {source}\nquestion: {question}")
    print(f"expected answer: {expected}\n" if expected else "")

    base_ms = _prefill_ms(model, inputs)
    rows = [("unpatched", None, base_ms, 1.0, _answer(model, processor, inputs))]
    panels = [overlay_kept(image, [], (1, 1), size=size, dim=0.0, title="input (as the model sees it)")]
    for name in args.strategy:
        with vtc.patched(model, name, keep=args.keep, processor=processor) as handle:
            ms = _prefill_ms(model, inputs)
            answer = _answer(model, processor, inputs)
            with torch.no_grad():
                model(**inputs)
            sample = handle.report().samples[0]
            grid = handle.adapter.grid()
            kept = handle.last_kept()[0]
            panels.append(
                overlay_kept(image, kept, grid, size=size, title=f"{name}: {len(kept)}/{sample.visual_in} kept")
            )
            rows.append((name, sample, ms, sample.flops_ratio, answer))

    n_text = int(inputs["attention_mask"].sum()) - (rows[1][1].visual_in if len(rows) > 1 else 0)
    header = (
        f"{'strategy':<10} {'visual tokens':>13} {'prefill ms':>10} {'vs unpatched':>12} {'LLM FLOPs':>9} "
        f"{'at 7B (est.)':>12}  answer"
    )
    print(header + "\n" + "-" * len(header))
    for name, sample, ms, flops, answer in rows:
        tokens = "all" if sample is None else f"{sample.visual_per_layer[-1]}/{sample.visual_in}"
        real = 1.0 if sample is None else real_size_ratio(name, args.keep, n_text)
        real = "-" if real is None else f"{real:.2f}x"
        print(f"{name:<10} {tokens:>13} {ms:>10.1f} {ms / base_ms:>11.2f}x {flops:>8.0%} {real:>12}  {answer!r}")
    print(
        "\nvisual tokens = tokens left at the last decoder layer; FLOPs = estimated LLM prefill FLOPs;\n"
        "prefill ms and 'vs unpatched' are measured here, on this 2M-parameter model, where the probes and the\n"
        "vision tower weigh as much as the tiny decoder, so a strategy can take longer than the unpatched model;\n"
        "'at 7B (est.)' is NOT measured: the prefill time vs unpatched that the same strategy and keep give the\n"
        "full llava-1.5-7b architecture (576 visual tokens, CLIP-L + 32 x 4096 Llama layers) by a FLOPs model\n"
        "('-': a schedule not set by keep alone; measured real-size numbers: eval/gpu_check.sh)"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(panels).save(out)
    print(f"overlay of the kept tokens: {out}")
    return 0


def _load_model(name: str | None, random_model: bool = False):
    """(model, processor, description): the embedded default (None), a local tiny id (`vtc.testing.TINY_MODEL_IDS`)
    or a HF checkpoint (hub id or folder), loaded with the class its config names."""
    if name is None:
        return _load_default_model(random_model)
    from . import testing

    if name in testing.TINY_MODEL_IDS:
        model, processor = testing.load_tiny_model(name)
        return model, processor, f"{name} (vtc.testing.load_tiny_model)"
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    names = [
        a for a in (getattr(AutoConfig.from_pretrained(name), "architectures", None) or []) if hasattr(transformers, a)
    ]
    cls = getattr(transformers, names[0]) if names else AutoModelForImageTextToText
    return cls.from_pretrained(name).eval(), AutoProcessor.from_pretrained(name), f"{name} ({cls.__name__})"


def _video_inputs(processor, clip, question: str):
    """(inputs, frame of each token unit): the processor's own video inputs through its chat template when it has a
    video token (OneVision, Qwen2-VL family, InternVL, ...), else the frames as the images of one prompt (LLaVA)."""
    import torch

    from vtc.video import ensure_video_processor

    frames = clip.images()
    if getattr(processor, "video_token", None) is None:
        from vtc.testing import llava_inputs

        return llava_inputs(processor, [question], [frames]), frames
    ensure_video_processor(processor)
    content = [{"type": "video"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], videos=[clip.frames], video_metadata=[clip.metadata], return_tensors="pt")
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}, frames


def _unit_layout(adapter, n_units: int):
    """The adapter's record of the last prefill's units; LLaVA-1.5 keeps none: its images are whole grids."""
    layout = getattr(adapter, "last_layout", None)
    if layout is not None:
        return layout
    from vtc.adapters.decoder import VisualLayout

    rows, cols = adapter.grid()
    return VisualLayout([rows * cols] * n_units, [(rows, cols)] * n_units, [0] * n_units)


def demo_video(args) -> int:
    """`vtc demo --video PATH`: per-frame kept tokens and budgets of each strategy, and a frame strip per strategy."""
    import torch

    import vtc
    from vtc.budget import tokens_to_keep
    from vtc.video import load_video
    from vtc.viz import frame_strip, grid_of_panels, kept_per_unit, save

    torch.manual_seed(0)
    keep = 0.5 if args.keep is None else args.keep
    strategies = args.strategy or list(DEFAULT_VIDEO_STRATEGIES)
    question = args.question if args.question != DEFAULT_QUESTION else DEFAULT_VIDEO_QUESTION
    if args.model is None:
        model, processor, model_name = _load_default_video_model(args.random_model)
    else:
        model, processor, model_name = _load_model(args.model, args.random_model)
    clip = load_video(args.video, max_frames=args.frames)
    inputs, frames = _video_inputs(processor, clip, question)
    image_model = getattr(processor, "video_token", None) is None
    stamps = ", ".join(f"{t:.2f}" for t in clip.timestamps or [])
    print(f"model: {model_name}\nvideo: {args.video}, {len(clip)}/{clip.total_frames} frames decoded by {clip.backend}")
    print(f"  at {clip.fps:g} fps; frame times (s): {stamps}")
    print(f"question: {question}\n")

    base_ms = _prefill_ms(model, inputs)
    rows = [("unpatched", "all", base_ms, 1.0, "", _answer(model, processor, inputs))]
    strips = []
    for name in strategies:
        options = {"processor": processor} if name == "quota" else {}
        with vtc.patched(model, name, keep=keep, **options) as handle:
            ms = _prefill_ms(model, inputs)
            answer = _answer(model, processor, inputs)
            with torch.no_grad():
                model(**inputs)
            sample = handle.report().samples[0]
            layout = _unit_layout(handle.adapter, len(sample.images))
            per_unit = kept_per_unit(layout, handle.last_kept()[0])
            plan = getattr(handle.strategy, "last_plan", None)
            if plan:  # quota: its per-frame budgets n_i
                budgets = [p["budget"] for p in sorted(plan, key=lambda p: p["unit"])]
            elif handle.strategy.has_pre_llm:  # one budget for every frame
                budgets = [tokens_to_keep(keep, c) for c in layout.counts]
            else:  # pruned inside the LLM: no per-frame budget
                budgets = [None] * len(per_unit)
            frames_per_unit = max(1, len(frames) // len(per_unit))
            shown = [frames[u * frames_per_unit] for u in range(len(per_unit))]
            title = f"{name} keep={keep}: kept {sum(map(len, per_unit))}/{sample.visual_in} visual tokens"
            strips.append(
                frame_strip(
                    shown,
                    per_unit,
                    layout.grids[0],
                    budgets=budgets,
                    size=max(max(f.size) for f in shown),
                    title=title,
                    crop=image_model,  # an image model's processor centre-crops; video processors resize
                )
            )
            cells = " ".join(f"{len(k)}" + ("" if b is None else f"/{b}") for k, b in zip(per_unit, budgets))
            rows.append(
                (name, f"{sample.visual_per_layer[-1]}/{sample.visual_in}", ms, sample.flops_ratio, cells, answer)
            )

    header = f"{'strategy':<10} {'visual tokens':>13} {'prefill ms':>10} {'vs unpatched':>12} {'LLM FLOPs':>9}"
    header += "  per-frame kept/budget"
    print(header + "\n" + "-" * len(header))
    for name, tokens, ms, flops, cells, answer in rows:
        print(f"{name:<10} {tokens:>13} {ms:>10.1f} {ms / base_ms:>11.2f}x {flops:>8.0%}  {cells}  answer {answer!r}")
    print("\nper-frame: tokens kept in each frame (or temporal patch) / its budget")
    print("(quota: weighted by each frame's relevance to the question; pre-LLM strategies: one budget per frame)")
    out = Path(args.out if args.out != "out/demo.png" else "out/demo_video.png")
    save(grid_of_panels(strips, 1), out)
    print(f"frame strip of the kept tokens: {out}")
    return 0


def list_cmd(args) -> int:
    import vtc
    from vtc.strategies.base import get_strategy_class

    print("strategies:")
    for name in vtc.list_strategies():
        cls = get_strategy_class(name)
        print(f"  {name:<10} stage={cls.stage:<8} default keep={str(getattr(cls, 'default_keep', 1.0)):<7} {cls.paper}")
    print("models:\n  " + "\n  ".join(vtc.supported_models()))
    return 0


def bench(args) -> int:
    sys.path.insert(0, str(ASSETS.parent))
    from eval.bench import main as bench_main

    bench_main(args.rest)
    return 0


def eval_cmd(args) -> int:
    from vtc.integrations.lmms_eval import parse_value
    from vtc.integrations.sweep import run_sweep

    model_args = dict(pair.split("=", 1) for pair in args.model_args.split(",") if pair) if args.model_args else {}
    rows = run_sweep(
        args.model,
        args.tasks,
        args.strategies,
        args.keeps,
        args.out,
        baselines=tuple(args.baselines),
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=args.limit,
        model_args={k: parse_value(v) for k, v in model_args.items()},
    )
    if rows:
        print((Path(args.out) / "sweep.md").read_text())
        print(f"table: {Path(args.out) / 'sweep.csv'}, plot: {Path(args.out) / 'sweep.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vtc", description="visual-token compression for HF VLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="unpatched vs patched on the embedded tiny model, with a token overlay")
    p.add_argument("--strategy", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_STRATEGIES)}; "
                   f"with --video: {' '.join(DEFAULT_VIDEO_STRATEGIES)}")  # fmt: skip
    p.add_argument("--keep", type=float, default=None, help="default 0.25; with --video 0.5")
    p.add_argument("--image", default=None, help="an image file (default: assets/demo.png)")
    p.add_argument("--video", default=None, help="a video file, e.g. assets/shapes.mp4: per-frame budgets, frame strip")
    p.add_argument("--frames", type=int, default=8, help="with --video: frames sampled, evenly spread (default 8)")
    p.add_argument("--model", default=None, help="with --video: a tiny id (vtc-tiny-qwen2-vl, vtc-tiny-onevision, ...) "
                   "or a HF checkpoint; default: the tiny video VLM (assets/tiny_video_vlm)")  # fmt: skip
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--sample", type=int, default=0, help="which held-out scene (trained model only)")
    p.add_argument("--out", default="out/demo.png")
    p.add_argument("--random-model", action="store_true", help="use the random-weight tiny LLaVA")
    p.set_defaults(func=demo)
    p = sub.add_parser("list", help="strategies and supported model classes")
    p.set_defaults(func=list_cmd)
    p = sub.add_parser("bench", help="efficiency benchmark (eval/bench.py; its flags follow, see --help there)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench)
    p = sub.add_parser("eval", help="sweep on lmms-eval tasks: unpatched, baselines, strategies x keeps; table + plot")
    p.add_argument("--model", default="vtc-tiny-vlm", help="hub id, local checkpoint or tiny id (vtc-tiny-vlm, ...)")
    p.add_argument("--tasks", nargs="+", required=True, help="lmms-eval task names")
    p.add_argument("--strategies", nargs="+", default=["fastv"], help="vtc strategies (besides the baselines)")
    p.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25], help="fractions of visual tokens kept")
    p.add_argument("--baselines", nargs="*", default=["random", "downsample"], help="dashed in the plot")
    p.add_argument("--include-path", default=None, help="a directory of task yamls (e.g. eval/lmms_tasks)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="questions per task (lmms-eval --limit)")
    p.add_argument("--model-args", default="", help="more VTCModel arguments, e.g. device_map=auto,dtype=bfloat16")
    p.add_argument("--out", default="out/sweep", help="output directory (cells/ keeps finished runs: resumable)")
    p.set_defaults(func=eval_cmd)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
