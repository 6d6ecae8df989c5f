"""`vtc demo | bench | list`."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_STRATEGIES = ("vtc_cls", "fopru", "fastv")
DEFAULT_QUESTION = "What colour is the circle?"


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


def list_cmd(args) -> int:
    import vtc
    from vtc.strategies.base import get_strategy_class

    print("strategies:")
    for name in vtc.list_strategies():
        cls = get_strategy_class(name)
        print(f"  {name:<10} stage={cls.stage:<8} default keep={getattr(cls, 'default_keep', 1.0):<7} {cls.paper}")
    print("models:\n  " + "\n  ".join(vtc.supported_models()))
    return 0


def bench(args) -> int:
    sys.path.insert(0, str(ASSETS.parent))
    from eval.bench import main as bench_main

    bench_main(args.rest)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vtc", description="visual-token compression for HF VLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="unpatched vs patched on the embedded tiny model, with a token overlay")
    p.add_argument("--strategy", nargs="+", default=list(DEFAULT_STRATEGIES))
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--image", default=None, help="an image file (default: assets/demo.png)")
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
