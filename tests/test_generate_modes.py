"""Every way users call generate() on a patched model, on every adapter family: beam search and sampling with
num_return_sequences, continuing from a returned cache, assisted decoding, static cache (refused), two threads
sharing one model, right padding, and an attention implementation switched after patch() (refused).

References: strategy "none" equals the unpatched model; a pruning strategy equals the oracle, the unpatched model
generating from the compacted sequence (the kept tokens at their original positions) with the same settings, or
(Qwen3-VL, whose DeepStack features the oracle cannot take) the same samples run alone."""

import threading

import pytest
import torch

import vtc
from vtc.strategies.base import prunes_images
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor
from vtc.testing.internvl import internvl_inputs, tiny_internvl, tiny_internvl_processor
from vtc.testing.internvl import make_wide_image as make_internvl_wide_image
from vtc.testing.llava_next import (
    make_wide_image,
    next_inputs,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl
from vtc.testing.qwen3_vl import qwen3_inputs, tiny_qwen3_processor, tiny_qwen3_vl

from .helpers import kept_rows, lm_input_embeds, mrope_positions, until_eos

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"]
QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word."]
OTHER = ["Where is it?", "Compare the two pictures, please."]


def _family(name, seed=0):
    """(model builder, inputs builder (questions, per-sample images) -> batch, images of batch A, images of batch B):
    batch A has one image per sample, batch B other images and two in its second sample."""
    if name == "llava":
        processor = tiny_llava_processor()
        return (
            lambda s: tiny_llava("llama", seed=s),
            lambda q, im: llava_inputs(processor, q, im),
            [[make_image(0)], [make_image(1)]],
            [[make_image(2)], [make_image(3), make_image(4)]],
        )
    if name in ("llava_next", "llava_onevision"):
        processor = tiny_llava_next_processor() if name == "llava_next" else tiny_llava_onevision_processor()
        build = (
            (lambda s: tiny_llava_next("llama", seed=s))
            if name == "llava_next"
            else (lambda s: tiny_llava_onevision("qwen2", seed=s))
        )
        return (
            build,
            lambda q, im: next_inputs(processor, q, im),
            [[make_wide_image(0)], [make_image(1)]],
            [[make_image(2)], [make_image(3), make_wide_image(4)]],
        )
    if name == "internvl":
        processor = tiny_internvl_processor()
        return (
            lambda s: tiny_internvl("qwen2", seed=s),
            lambda q, im: internvl_inputs(processor, q, im),
            [[make_internvl_wide_image(0)], [make_image(1, size=48)]],
            [[make_image(2, size=48)], [make_image(3, size=48), make_internvl_wide_image(4)]],
        )
    if name == "qwen3_vl":
        processor = tiny_qwen3_processor()
        return (
            lambda s: tiny_qwen3_vl("qwen3_vl", seed=s),
            lambda q, im: qwen3_inputs(processor, q, images=im),
            [[make_image(0, size=64)], [make_image(1, size=96)]],
            [[make_image(2, size=64)], [make_image(3, size=64), make_image(4, size=96)]],
        )
    processor = tiny_qwen_processor()
    return (
        lambda s: tiny_qwen_vl(name, seed=s),
        lambda q, im: qwen_inputs(processor, q, images=im),
        [[make_image(0, size=56)], [make_image(1, size=84)]],
        [[make_image(2, size=56)], [make_image(3, size=56), make_image(4, size=84)]],
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    build, inputs, images_a, images_b = _family(request.param)
    return {
        "name": request.param,
        "model": build(31),
        "build": build,
        "inputs": lambda q, im: dict(inputs(q, im)),
        "a": dict(inputs(QUESTIONS, images_a)),
        "b": dict(inputs(OTHER, images_b)),
        "images_a": images_a,
    }


def probe_strategy(name: str) -> str:
    """A pre-LLM strategy with a vision probe the family has ([CLS] attention; SigLIP has no [CLS]: fopru)."""
    return "fopru" if name == "llava_onevision" else "vtc_cls"


def visual_and_positions(model, name, inputs):
    """The unpatched model's language-model input: embeddings, visual-token mask (vtc's: NeXT newline tokens are
    text) and position ids ((B, L), or (3, B, L) M-RoPE)."""
    embeds = lm_input_embeds(model, inputs)
    ids = inputs["input_ids"]
    if name.startswith("qwen"):
        return embeds, inputs["mm_token_type_ids"] > 0, mrope_positions(model, inputs)
    visual = ids == model.config.image_token_id
    if name in ("llava_next", "llava_onevision"):
        visual &= ~(embeds == model.model.image_newline).all(-1)
    mask = inputs["attention_mask"]
    return embeds, visual, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def oracle_generate(model, name, inputs, kept, **options) -> torch.Tensor:
    """The unpatched model generating from the left-padded batch of compacted sequences (kept visual tokens and the
    text, at their original positions)."""
    embeds, visual, positions = visual_and_positions(model, name, inputs)
    rows = [kept_rows(inputs, visual, kept, b) for b in range(len(kept))]
    width = max(len(r) for r in rows)
    batch = len(rows)
    compact = embeds.new_zeros(batch, width, embeds.shape[-1])
    mask = torch.zeros(batch, width, dtype=torch.long)
    compact_positions = torch.ones(*positions.shape[:-2], batch, width, dtype=torch.long)
    for b, r in enumerate(rows):
        compact[b, width - len(r) :] = embeds[b, r]
        mask[b, width - len(r) :] = 1
        compact_positions[..., b, width - len(r) :] = positions[..., b, r]
    with torch.no_grad():
        return model.generate(inputs_embeds=compact, attention_mask=mask, position_ids=compact_positions, **options)


GENERATE_MODES = {
    "beams": dict(num_beams=2, num_return_sequences=2, do_sample=False),
    "sampling": dict(do_sample=True, num_return_sequences=2, top_k=0),
}


def generated(model, inputs, seed=0, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, **options)[:, inputs["input_ids"].shape[1] :]


# --- 1. beam search and num_return_sequences ------------------------------------------------------------------
@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_expanded_batch_none_equals_unpatched(family, mode):
    model, inputs = family["model"], family["a"]
    reference = generated(model, inputs, **GENERATE_MODES[mode])
    with vtc.patched(model, "none"):
        assert torch.equal(generated(model, inputs, **GENERATE_MODES[mode]), reference)


@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_expanded_batch_equals_oracle(family, mode):
    """Every copy of a sample (beam, returned sequence) decodes from its sample's selection: the tokens equal the
    oracle's with the same settings; the report lists each sample once, with the selection of a plain forward."""
    name, model, inputs = family["name"], family["model"], family["a"]
    options = GENERATE_MODES[mode]
    with vtc.patched(model, probe_strategy(name), keep=0.25) as handle:
        with torch.no_grad():
            model(**inputs)
        kept = handle.last_kept()
        out = generated(model, inputs, **options)
        assert [torch.equal(a, b) for a, b in zip(handle.last_kept(), kept)] == [True, True]
        if name == "qwen3_vl":  # DeepStack: no oracle generate. Beams: each sample alone gives the same beams;
            images = family_images(family, "a")  # sampling: the batch with every sample given twice, same seed
            if mode == "beams":
                for b in range(2):
                    alone = generated(model, family["inputs"](QUESTIONS[b : b + 1], [images[b]]), **options)
                    assert until_eos(out[2 * b : 2 * b + 2], eos(model)) == until_eos(alone, eos(model))
            else:
                twice = family["inputs"]([q for q in QUESTIONS for _ in "ab"], [im for im in images for _ in "ab"])
                repeated = generated(model, twice, **dict(options, num_return_sequences=1))
                assert until_eos(out, eos(model)) == until_eos(repeated, eos(model))
            return
    torch.manual_seed(0)
    oracle = oracle_generate(model, name, inputs, kept, max_new_tokens=4, **options)
    assert until_eos(out, eos(model)) == until_eos(oracle, eos(model))


def test_in_llm_strategy_beams_equal_samples_alone(family):
    """FastV selects inside the LLM from the last prompt token: each sample's beams in the batch equal its beams
    alone."""
    model = family["model"]
    images = family_images(family, "a")
    options = GENERATE_MODES["beams"]
    with vtc.patched(model, "fastv", keep=0.25):
        out = generated(model, family["a"], **options)
        for b in range(2):
            alone = generated(model, family["inputs"](QUESTIONS[b : b + 1], [images[b]]), **options)
            assert until_eos(out[2 * b : 2 * b + 2], eos(model)) == until_eos(alone, eos(model))


def test_beams_without_cache_refused(family):
    with vtc.patched(family["model"], "fastv", keep=0.25), pytest.raises(NotImplementedError, match="use_cache"):
        generated(family["model"], family["a"], num_beams=2, use_cache=False)


# --- 2. continuing from a returned cache ----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["probe", "fastv"])
def test_continuation_equals_one_longer_call(family, strategy):
    model, inputs = family["model"], family["a"]
    strategy = probe_strategy(family["name"]) if strategy == "probe" else strategy
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtc.patched(model, strategy, keep=0.25) as handle:
        longer = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, prompt:]
        kept = handle.last_kept()
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
        assert first.past_key_values.get_seq_length() == prompt + 2  # logical: the last token is not cached yet
        more = model.generate(
            input_ids=first.sequences,
            attention_mask=mask,
            past_key_values=first.past_key_values,
            max_new_tokens=3,
            do_sample=False,
        )[:, prompt:]
        assert [torch.equal(a, b) for a, b in zip(handle.last_kept(), kept)] == [True, True]
    assert until_eos(more, eos(model)) == until_eos(longer, eos(model))


# --- 3. assisted decoding and static cache --------------------------------------------------------------------
def test_assisted_decoding_equals_plain_greedy(family):
    """Greedy assisted decoding gives the main model's greedy tokens: the patched main model (its selection made on
    the prompt alone, as in plain generate) with an unpatched assistant; on LLaVA-1.5 also with a patched one."""
    model = family["model"]
    assistant = family["build"](32)
    one = family["inputs"](QUESTIONS[:1], family_images(family, "a")[:1])
    with vtc.patched(model, probe_strategy(family["name"]), keep=0.25) as handle:
        plain = generated(model, one, do_sample=False)
        kept = handle.last_kept()
        assisted = generated(model, one, do_sample=False, assistant_model=assistant)
        assert torch.equal(handle.last_kept()[0], kept[0])
        assert until_eos(assisted, eos(model)) == until_eos(plain, eos(model))
        with vtc.patched(assistant, "fastv", keep=0.5):
            if family["name"] == "llava":  # lays out its visual tokens from the prompt alone
                assisted = generated(model, one, do_sample=False, assistant_model=assistant)
                assert until_eos(assisted, eos(model)) == until_eos(plain, eos(model))
            else:  # the assistant gets the main model's vision features: its tower never runs under vtc's hooks
                with pytest.raises(NotImplementedError, match="leave the assistant unpatched"):
                    generated(model, one, do_sample=False, assistant_model=assistant)
        with vtc.patched(assistant, probe_strategy(family["name"]), keep=0.5):
            with pytest.raises(NotImplementedError, match="leave the assistant unpatched"):
                generated(model, one, do_sample=False, assistant_model=assistant)


def test_static_cache_refused(family):
    model = family["model"]
    with vtc.patched(model, "fastv", keep=0.25):
        with pytest.raises(NotImplementedError, match="cache_implementation='static'"):
            generated(model, family["a"], do_sample=False, cache_implementation="static")


# --- 4. threads -----------------------------------------------------------------------------------------------
def test_threads_sharing_a_model_keep_their_selections(family):
    """Two threads, different images and image counts, many calls on one patched model: every call's logits, kept
    tokens, report and greedy tokens equal the same call run alone."""
    name, model = family["name"], family["model"]
    batches = [family["a"], family["b"]]
    with torch.no_grad(), vtc.patched(model, probe_strategy(name), keep=0.25) as handle:
        alone = []
        for inputs in batches:
            logits = model(**inputs).logits
            alone.append((logits, handle.last_kept(), str(handle.report()), generated(model, inputs, do_sample=False)))
        start, failures = threading.Barrier(2), []

        def work(index):
            inputs = batches[index]
            logits, kept, report, tokens = alone[index]
            start.wait()
            try:
                for call in range(4):
                    with torch.no_grad():
                        out = model(**inputs).logits
                    same = torch.allclose(out, logits, atol=1e-5, rtol=0)
                    same &= all(torch.equal(a, b) for a, b in zip(handle.last_kept(), kept))
                    same &= str(handle.report()) == report
                    if call == 2:
                        same &= torch.equal(generated(model, inputs, do_sample=False), tokens)
                    if not same:
                        failures.append((index, call))
            except Exception as error:  # noqa: BLE001 (reported by the main thread)
                failures.append((index, repr(error)))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


# --- 5. right padding -----------------------------------------------------------------------------------------
def right_padded(inputs: dict) -> dict:
    """The same batch with the padding moved to the right of every row."""
    out = dict(inputs)
    pads = (inputs["attention_mask"] == 0).sum(1)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            out[key] = torch.stack([row.roll(-int(p)) for row, p in zip(inputs[key], pads)])
    return out


def test_right_padding_selects_by_the_real_last_token(family):
    """FastV reads the last prompt token's attention: under right padding that is the last valid token, so every
    row keeps what it keeps alone and its logits (at its valid positions) equal its logits alone."""
    model, inputs = family["model"], right_padded(family["a"])
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    assert max(pads) > 0
    images = family_images(family, "a")
    with torch.no_grad(), vtc.patched(model, "fastv", keep=0.25) as handle:
        out = model(**inputs).logits
        kept = handle.last_kept()
        for b in range(2):
            alone = model(**family["inputs"](QUESTIONS[b : b + 1], [images[b]])).logits[0]
            assert torch.equal(handle.last_kept()[0], kept[b])
            end = out.shape[1] - pads[b]
            assert (out[b, end - alone.shape[0] : end] - alone).abs().max() <= 1e-5


# --- 6. attention implementation switched after patch() -------------------------------------------------------
def test_attention_switched_after_patch_refused(family):
    model, inputs = family["model"], family["a"]
    lm_config = model.model.language_model.config
    with vtc.patched(model, "fastv", keep=0.25):
        try:
            model.set_attn_implementation("flex_attention")
        except ValueError:  # transformers refuses flex for this class: switch the text config as it would
            lm_config._attn_implementation = "flex_attention"
        try:
            with pytest.raises(NotImplementedError, match="set_attn_implementation"):
                with torch.no_grad():
                    model(**inputs)
            with pytest.raises(NotImplementedError, match="set_attn_implementation"):
                generated(model, inputs, do_sample=False)
        finally:
            model.set_attn_implementation("sdpa")
        assert lm_config._attn_implementation == "sdpa"
        with torch.no_grad():
            model(**inputs)


# --- helpers --------------------------------------------------------------------------------------------------
def eos(model) -> int:
    return model.config.text_config.eos_token_id


def family_images(family, batch: str) -> list:
    return family["images_" + batch]


def test_kv_policy_refuses_beams_and_foreign_caches(llava, batch3):
    """A KV policy keeps per-row eviction state for the last prefill of its thread: beams, and continuing a cache
    after another prefill, are refused with the way out."""
    inputs = batch3[2]
    with torch.no_grad(), vtc.patched(llava, "fastv", keep=0.25, kv="streaming", kv_budget=16):
        with pytest.raises(NotImplementedError, match="without kv="):
            llava.generate(**inputs, max_new_tokens=2, num_beams=2)
        first = llava.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        llava(**inputs)  # another prefill
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, 2, dtype=torch.long)], dim=1)
        with pytest.raises(NotImplementedError, match="without kv="):
            llava.generate(
                input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values, max_new_tokens=1
            )


@pytest.mark.parametrize("strategy", [s for s in vtc.list_strategies() if prunes_images(s)])
def test_every_strategy_beams_on_llava(strategy, llava, processor):
    """Every strategy under beam search (LLaVA-1.5, one image and two images): the two-image sample's beams in the
    (padded) batch equal its beams alone, and the report keeps what a plain forward keeps."""
    images = [[make_image(0)], [make_image(1), make_image(2)]]
    inputs = dict(llava_inputs(processor, QUESTIONS, images))
    options = dict(num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.no_grad(), vtc.patched(llava, strategy, keep=0.25, processor=processor) as handle:
        llava(**inputs)
        kept = handle.last_kept()
        out = generated(llava, inputs, **options)
        assert all(torch.equal(a, b) for a, b in zip(handle.last_kept(), kept))
        alone = generated(llava, dict(llava_inputs(processor, QUESTIONS[1:], images[1:])), **options)
        assert until_eos(out[2:], eos(llava)) == until_eos(alone, eos(llava))
