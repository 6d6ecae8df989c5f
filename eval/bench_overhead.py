"""Overhead of vtc's selection: prefill time of the patched model / prefill time of the unpatched model
fed an equally short input (DESIGN.md, section 5).

The reference for a pre-LLM strategy is the unpatched vision tower + projector on the image, then the
unpatched language model on the compacted embeddings at the kept tokens' original positions. For an
in-LLM strategy pruning before layer K, the reference runs the unpatched layers 0..K-1 on the full
sequence and the unpatched layers K.. on the compacted one. Every time is a median over repeats, patched
and reference runs interleaved, all in one process (so only the ratios are meaningful).

    python eval/bench_overhead.py                 # mid-size LLaVA config (hidden 1024, 8 layers, 576 tokens)
    python eval/bench_overhead.py --quick         # tiny config, a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import vtc
from vtc.strategies.base import prunes_images
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor


def mid_size_llava(quick: bool):
    if quick:
        return tiny_llava("llama", seed=0), tiny_llava_processor()
    kwargs = dict(
        image_size=336,
        patch_size=14,
        vision_layers=6,
        vision_hidden=256,
        text_layers=8,
        text_hidden=1024,
        initializer_range=0.02,
    )
    return tiny_llava("llama", seed=0, **kwargs), tiny_llava_processor(image_size=336, patch_size=14)


def layers_view(lm, start: int, stop: int):
    """An unpatched model of lm's class running only decoder layers start..stop-1 (weights shared)."""
    config = copy.deepcopy(lm.config)
    config.num_hidden_layers = stop - start
    view = type(lm)(config)
    view.layers = torch.nn.ModuleList(lm.layers[start:stop])
    view.norm = lm.norm if stop == lm.config.num_hidden_layers else torch.nn.Identity()
    view.rotary_emb = lm.rotary_emb
    return view.eval()


def short_input_reference(model, inputs, kept: torch.Tensor, stage: str, layer: int | None):
    """The unpatched model fed the equally short input: a callable doing one reference prefill (batch 1).

    LLaVA-style models (1-D positions) and Qwen-VL (the 3-D M-RoPE positions the model computes, compacted);
    None for a model whose image features do not map one to one onto its placeholder tokens here (anyres
    packing with newline tokens, Qwen3-VL's DeepStack)."""
    lm, inner = model.model.language_model, model.model
    ids = inputs["input_ids"]
    device = ids.device
    visual = ids[0] == model.config.image_token_id
    rows = (~visual).clone()
    rows[visual.nonzero().squeeze(1)[kept]] = True
    rows = rows.nonzero().squeeze(1)
    short_mask = torch.ones(1, len(rows), dtype=torch.long, device=device)
    if "image_grid_thw" in inputs:
        if getattr(model.config.vision_config, "deepstack_visual_indexes", None):
            return None
        positions, _ = inner.get_rope_index(
            ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        vision = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    elif set(inputs) <= {"input_ids", "attention_mask", "pixel_values"}:
        positions = torch.arange(len(visual), device=device)[None]
        vision = dict(pixel_values=inputs["pixel_values"])
    else:
        return None
    if stage == "llm":
        lower, upper = layers_view(lm, 0, layer), layers_view(lm, layer, lm.config.num_hidden_layers)

    def reference():
        features = torch.cat(inner.get_image_features(**vision).pooler_output)
        embeds = inner.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(visual[None, :, None], features.to(embeds.dtype))
        if stage == "pre_llm":
            out = lm(
                inputs_embeds=embeds[:, rows], position_ids=positions[..., rows], attention_mask=short_mask,
                use_cache=True,
            )
        else:
            # separate caches: the upper view's layers fill their own slots of the second one
            lower_cache, upper_cache = DynamicCache(config=lm.config), DynamicCache(config=lm.config)
            mid = lower(inputs_embeds=embeds, position_ids=positions, past_key_values=lower_cache)
            out = upper(
                inputs_embeds=mid.last_hidden_state[:, rows],
                position_ids=positions[..., rows],
                attention_mask=short_mask,
                past_key_values=upper_cache,
            )
        return model.lm_head(out.last_hidden_state[:, -1:])

    return reference


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False, keeps=(0.1, 0.25, 0.5), strategies=None, repeats: int = 5) -> list[dict]:
    torch.manual_seed(0)
    model, processor = mid_size_llava(quick)
    inputs = llava_inputs(processor, ["Describe the picture in detail, please."], [[make_image(0)]])
    visual = inputs["input_ids"][0] == model.config.image_token_id
    strategies = strategies or [s for s in vtc.list_strategies() if s != "none" and prunes_images(s)]
    rows = []
    with torch.no_grad():
        for name in strategies:
            for keep in keeps:
                handle = vtc.patch(model, name, keep=keep)
                model(**inputs, logits_to_keep=1)  # warm-up, and the selection to feed the reference
                kept = handle.last_kept("final")[0]
                stage, layer = handle.strategy.stage, handle.strategy.llm_layer
                handle.unpatch()

                reference = short_input_reference(model, inputs, kept, stage, layer)
                patched_times, reference_times, unpatched_times = [], [], []
                for _ in range(repeats):  # interleaved, so drift hits all three alike
                    unpatched_times.append(median_time(lambda: model(**inputs, logits_to_keep=1), 1))
                    with vtc.patched(model, name, keep=keep):
                        patched_times.append(median_time(lambda: model(**inputs, logits_to_keep=1), 1))
                    reference_times.append(median_time(reference, 1))
                t_patched, t_ref = statistics.median(patched_times), statistics.median(reference_times)
                unpatched = statistics.median(unpatched_times)
                rows.append(
                    dict(
                        strategy=name,
                        keep=keep,
                        stage=stage,
                        visual_kept=len(kept),
                        visual_in=int(visual.sum()),
                        t_unpatched_ms=1000 * unpatched,
                        t_patched_ms=1000 * t_patched,
                        t_reference_ms=1000 * t_ref,
                        overhead=t_patched / t_ref,
                        speedup=unpatched / t_patched,
                    )
                )
                print(
                    f"{name:>8} keep={keep:<5} kept={len(kept):>4}  patched {1000 * t_patched:8.1f} ms  "
                    f"short-input reference {1000 * t_ref:8.1f} ms  overhead {t_patched / t_ref:5.3f}  "
                    f"speedup vs unpatched {unpatched / t_patched:4.2f}x",
                    flush=True,
                )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="eval/results/overhead_cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick, args.keep, args.strategies, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
