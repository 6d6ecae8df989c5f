"""Oracles shared by the tests: the unpatched model run on what a strategy kept."""

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


def greedy_recompute(model, inputs, steps: int) -> torch.Tensor:
    """Greedy decoding with no cache: the whole sequence is re-run at every step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=inputs["pixel_values"],
            position_ids=positions,
            use_cache=False,
        )
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
