"""Oracles shared by the tests (the unpatched model run on what a strategy kept) and the DESIGN.md section 4
invariant checks that several adapters' and strategies' tests run alike."""

from __future__ import annotations

import torch

import vtc


def full_embeds(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_embeds with image features scattered in, as the unpatched LlavaModel builds them."""
    inner = model.model
    embeds = inner.get_input_embeddings()(inputs["input_ids"])
    features = torch.cat(inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    visual = inputs["input_ids"] == model.config.image_token_id
    return embeds.masked_scatter(visual[..., None], features.to(embeds.dtype)), visual


def kept_rows(inputs, visual: torch.Tensor, kept: list[torch.Tensor], b: int) -> torch.Tensor:
    """Indices (into the logical sequence) of sample b's valid text tokens and kept visual tokens."""
    valid = inputs["attention_mask"][b].bool()
    vis_positions = visual[b].nonzero().squeeze(1)
    keep = valid & ~visual[b]
    keep[vis_positions[kept[b]]] = True
    return keep.nonzero().squeeze(1)


def pre_llm_oracle_logits(model, inputs, kept: list[torch.Tensor], b: int) -> torch.Tensor:
    """Unpatched language model on sample b's compacted sequence, at the kept tokens' original positions."""
    embeds, visual = full_embeds(model, inputs)
    rows = kept_rows(inputs, visual, kept, b)
    lm = model.model.language_model
    out = lm(
        inputs_embeds=embeds[b : b + 1, rows],
        position_ids=rows[None],
        attention_mask=torch.ones(1, len(rows), dtype=torch.long),
        use_cache=False,
    )
    return model.lm_head(out.last_hidden_state)[0]


def upper_layers(lm, start: int):
    """A model of the same class that runs only decoder layers start.. of `lm` (shared weights)."""
    import copy

    config = copy.deepcopy(lm.config)
    config.num_hidden_layers = lm.config.num_hidden_layers - start
    sub = type(lm)(config)
    sub.layers = torch.nn.ModuleList(lm.layers[start:])
    sub.norm, sub.rotary_emb = lm.norm, lm.rotary_emb
    return sub.eval()


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def instance_attributes(model: torch.nn.Module) -> dict[str, set[str]]:
    return {name: set(vars(m)) for name, m in model.named_modules()}


def greedy_recompute(model, inputs, steps: int, vision_keys=("pixel_values",)) -> torch.Tensor:
    """Greedy decoding with no cache: the whole sequence (and the `vision_keys` of `inputs` it has) is re-run at
    every step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    vision = {k: inputs[k] for k in vision_keys if k in inputs}
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **vision)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids[:, inputs["input_ids"].shape[1] :]


def until_eos(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def assert_keep_one_is_identity(model, inputs, strategy, **options) -> None:
    """DESIGN.md invariant: keep=1.0 gives the unpatched logits (max abs diff <= 1e-5 at valid positions)."""
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtc.patched(model, strategy, keep=1.0, **options):
            out = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert out.shape == ref.shape
    assert (out - ref)[valid].abs().max() <= 1e-5


def assert_text_only_passes_through(model, inputs, strategy: str, generate_tokens: int = 0) -> None:
    """DESIGN.md invariant: a prompt without visual tokens gives exactly the unpatched logits (and greedy
    tokens, when `generate_tokens` > 0), and the report says so."""
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=generate_tokens, do_sample=False) if generate_tokens else None
        with vtc.patched(model, strategy, keep=0.25) as handle:
            assert torch.equal(model(**inputs).logits, ref)
            if generate_tokens:
                out = model.generate(**inputs, max_new_tokens=generate_tokens, do_sample=False)
                assert torch.equal(out, ref_gen)
            assert "text-only" in str(handle.report())


def assert_generate_keep_one_equals_unpatched(model, inputs, tokens: int) -> None:
    """generate() under FastV at keep=1.0 gives the unpatched greedy tokens."""
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        with vtc.patched(model, "fastv", keep=1.0):
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    assert torch.equal(out, ref)


def assert_batch_equals_each_sample_alone(
    model, inputs, alone: dict, strategy, *, tokens: int = 3, stop_at_eos: bool = False, **options
) -> None:
    """DESIGN.md invariant: under `strategy`, sample b of the (left padded) batch `inputs` keeps the same tokens
    and gives the same logits (<= 1e-5) and greedy tokens as `alone[b]`, that sample on its own; with
    `stop_at_eos` the tokens are compared up to the first eos."""
    with torch.no_grad(), vtc.patched(model, strategy, **options) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept()
        gen = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        for b, one in alone.items():
            out_b = model(**one).logits
            assert torch.equal(handle.last_kept()[0], kept[b])
            assert (out[b, -out_b.shape[1] :] - out_b[0]).abs().max() <= 1e-5
            gen_b = model.generate(**one, max_new_tokens=tokens, do_sample=False)[:, one["input_ids"].shape[1] :]
            if stop_at_eos:
                eos = model.config.text_config.eos_token_id
                assert until_eos(gen[b : b + 1], eos) == until_eos(gen_b, eos)
            else:
                assert gen[b].tolist() == gen_b[0].tolist()


def restore_snapshot(model, inputs) -> dict:
    """What unpatch() must give back: the logits on `inputs`, the hook count, the instance attributes, the weights."""
    with torch.no_grad():
        logits = model(**inputs).logits  # transformers installs its own output-capturing hooks on a first call
    return {
        "logits": logits,
        "hooks": hook_count(model),
        "attributes": instance_attributes(model),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_restored(model, inputs, snapshot: dict) -> None:
    """DESIGN.md invariant: after unpatch(), the model is exactly as in `snapshot` (see `restore_snapshot`)."""
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, snapshot["logits"])
    assert hook_count(model) == snapshot["hooks"]
    assert instance_attributes(model) == snapshot["attributes"]
    assert all(torch.equal(v, snapshot["state"][k]) for k, v in model.state_dict().items())


def announced_fallback_report(model, inputs, strategy, match: str, **options):
    """Patch with `strategy` expecting the UserWarning `match` (the announced fallback), run `inputs` once,
    unpatch; the report."""
    import pytest

    with pytest.warns(UserWarning, match=match):
        handle = vtc.patch(model, strategy, **options)
    try:
        with torch.no_grad():
            model(**inputs)
        report = handle.report()
    finally:
        handle.unpatch()
    return report


def saved_weights_logits(model, inputs, name: str, path, trained) -> tuple[torch.Tensor, object]:
    """`name` patched with the weights saved at `path` (no fallback warning allowed): its logits on `inputs` and
    its report; asserts they equal the logits of the `trained` strategy object itself."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained weights: no fallback warning
        with torch.no_grad(), vtc.patched(model, name, weights=path) as handle:
            loaded = model(**inputs).logits
            report = handle.report()
    with torch.no_grad(), vtc.patched(model, trained):
        assert torch.equal(loaded, model(**inputs).logits)
    return loaded, report


# --- Qwen2-VL / Qwen3-VL (M-RoPE) ---------------------------------------------------------------------------
MROPE_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def mrope_positions(model, inputs) -> torch.Tensor:
    """The (3, B, L) M-RoPE position ids HF's rope-index helper gives `inputs`."""
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    return positions


def mrope_greedy_recompute(model, inputs, steps: int) -> torch.Tensor:
    """Greedy decoding with no cache: the whole sequence (pixels, grids, token types) re-run at every step."""
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    extra = {k: inputs[k] for k in MROPE_VISION_KEYS if k in inputs}
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False, **extra)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        types = torch.cat([types, torch.zeros_like(nxt)], 1)
    return ids[:, inputs["input_ids"].shape[1] :]


def per_unit_kept(layout, kept) -> list[int]:
    """Kept tokens per unit (image / video frame), from per-sample kept indices."""
    out, sample_start = [], {}
    for start, count, sample in zip(layout.starts, layout.counts, layout.sample_of_image):
        local = start - sample_start.setdefault(sample, start)
        out.append(int(((kept[sample] >= local) & (kept[sample] < local + count)).sum()))
    return out


def assert_mrope_decode_positions_are_logical(model, inputs) -> None:
    """A manual decode step with no mask and no position ids after a pruned prefill (one image, `inputs` without
    attention_mask) continues at the logical positions (the physical cache is shorter): it equals the no-cache
    recompute."""
    with torch.no_grad(), vtc.patched(model, "vtc_cls", keep=0.25) as handle:
        first = model(**inputs, use_cache=True)
        nxt = first.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, past_key_values=first.past_key_values, use_cache=True).logits[0, -1]
        cache = first.past_key_values  # physically shorter; it reports the logical length (prompt + 1 step)
        assert cache.layers[0].keys.shape[-2] < inputs["input_ids"].shape[1] == cache.get_seq_length() - 1
        handle.reuse_selection = True
        ids = torch.cat([inputs["input_ids"], nxt], 1)
        full = model(
            input_ids=ids,
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(nxt)], 1),
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            use_cache=False,
        ).logits[0, -1]
    assert (step - full).abs().max() <= 1e-5


# --- models whose language model gets 1-D positions (LLaVA-NeXT / OneVision, InternVL) -----------------------
def lm_input_embeds(model, inputs) -> torch.Tensor:
    """The inputs_embeds the unpatched model hands its language model."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def compacted_oracle_logits(model, inputs, kept, b, full) -> torch.Tensor:
    """Unpatched language model on sample b's compacted sequence at the kept tokens' original positions (counted
    from the first valid token); `full` = (inputs_embeds, visual mask) of the unpatched model."""
    embeds, visual = full
    rows = kept_rows(inputs, visual, kept, b)
    positions = (inputs["attention_mask"][b].cumsum(-1) - 1)[rows]
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=embeds[b : b + 1, rows],
            position_ids=positions[None],
            attention_mask=torch.ones(1, len(rows), dtype=torch.long),
            use_cache=False,
        )
        return model.lm_head(out.last_hidden_state)[0]


def expected_kept(keep, n: int) -> int:
    """Tokens a unit of n keeps under `keep` (an int: that many, at most n; a fraction: round half up, >= 1)."""
    return min(keep, n) if isinstance(keep, int) else max(1, int(n * keep + 0.5))


def assert_cached_generate_equals_recompute(
    model, inputs, strategy, tokens: int, recompute=greedy_recompute, *, also_uncached: bool = False, **options
) -> None:
    """DESIGN.md invariant: under `strategy`, generate() with the KV cache gives the greedy tokens (up to eos) of
    `recompute(model, inputs, tokens)`, which re-runs the whole sequence at every step from the same selection;
    with `also_uncached`, so does generate(use_cache=False)."""
    eos = model.config.text_config.eos_token_id
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtc.patched(model, strategy, **options) as handle:
        cached = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)[:, prompt:]
        handle.reuse_selection = True
        recomputed = recompute(model, inputs, tokens)
        if also_uncached:
            uncached = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, use_cache=False)
    assert until_eos(cached, eos) == until_eos(recomputed, eos)
    if also_uncached:
        assert until_eos(uncached[:, prompt:], eos) == until_eos(cached, eos)


def assert_unpatch_restores_exactly(model, inputs, strategy="vtc_cls", generate_tokens: int = 0, **options):
    """DESIGN.md invariant: patch (hooks added, `inputs` pruned), run (and generate `generate_tokens`), unpatch:
    the model is exactly as before (`restore_snapshot`). Returns the handle."""
    before = restore_snapshot(model, inputs)
    with torch.no_grad():
        handle = vtc.patch(model, strategy, **options)
        assert hook_count(model) > before["hooks"]
        assert model(**inputs).logits.shape != before["logits"].shape
        if generate_tokens:
            model.generate(**inputs, max_new_tokens=generate_tokens, do_sample=False)
        handle.unpatch()
    assert_restored(model, inputs, before)
    return handle


def assert_unpatch_restores_image_and_video(model, images, video, strategy, installed, **options) -> None:
    """DESIGN.md invariant: patch (hooks added, `installed(model)` true, `images` pruned), run the image and the
    video batch, unpatch: the same logits on both, the same hooks and instance attributes, the handle inactive."""
    with torch.no_grad():
        ref, ref_video = model(**images).logits, model(**video).logits
    hooks, attributes = hook_count(model), instance_attributes(model)
    with torch.no_grad():
        handle = vtc.patch(model, strategy, **options)
        assert hook_count(model) > hooks and installed(model)
        assert model(**images).logits.shape != ref.shape
        model(**video)
        handle.unpatch()
        assert torch.equal(model(**images).logits, ref) and torch.equal(model(**video).logits, ref_video)
    assert hook_count(model) == hooks
    assert instance_attributes(model) == attributes
    assert not handle.active


def assert_unit_budgets_and_oracle(model, inputs, full, strategy, keep, unit_size) -> None:
    """Pre-LLM pruning on per-unit layouts (LLaVA-NeXT crops / frames, InternVL tiles): every unit keeps
    `expected_kept(keep, unit_size(row))` (row: its `kept_by_unit` entry), a sample keeps the sum of its units,
    sorted; its logits equal `compacted_oracle_logits`; the layout covers every visual token of `full`."""
    from vtc.adapters.llava_next import kept_by_unit

    with torch.no_grad(), vtc.patched(model, strategy, keep=keep) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        layout = handle.adapter.last_layout
        units = kept_by_unit(handle, "pre_llm")
    for b, rows in enumerate(units):
        for row in rows:  # every unit (base image, crop, tile, frame) got its own budget
            assert len(row["kept"]) == expected_kept(keep, unit_size(row)), row
        assert len(kept[b]) == sum(len(r["kept"]) for r in rows)
        assert torch.equal(kept[b], kept[b].sort().values)
        oracle = compacted_oracle_logits(model, inputs, kept, b, full)
        assert (out[b, -len(oracle) :] - oracle).abs().max() <= 1e-5
    assert sum(layout.counts) == int(full[1].sum())
