"""HiRED (Arif et al., AAAI 2025): the budget allocation against hand-computed cases (spatial regions and the
official contiguous chunks), the kept tokens against a reference built from the unpatched vision tower's
eager attention weights (tests only: the library never asks for output_attentions), realised budgets, the
single-partition rule on LLaVA-1.5, refusals on towers without [CLS], and the DESIGN.md invariants."""

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

import vtc
from vtc.adapters.llava_next import kept_by_unit
from vtc.strategies.hired import SINGLE_PARTITION_NOTE, allocate, chunk_regions, spatial_regions, total_budget
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor
from vtc.testing.llava_next import (
    make_wide_image,
    next_inputs,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
)
from vtc.testing.qwen2_vl import qwen_inputs, tiny_qwen_processor, tiny_qwen_vl

from .helpers import (
    assert_keep_one_is_identity,
    compacted_oracle_logits,
    greedy_recompute,
    hook_count,
    instance_attributes,
    pre_llm_oracle_logits,
    until_eos,
)
from .test_llava_next import VISION_KEYS, lm_inputs

QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word.", "Where is it?"]
IMAGES = [[make_wide_image(0)], [make_image(1)], [make_wide_image(2, (64, 96))]]
# 4 x 4 full-image grid; the top-8 budget-layer tokens are 0, 1, 2, 3, 4, 5, 8, 12
SCORES = torch.tensor([16.0, 15, 14, 13, 12, 11, 0.1, 0.2, 10, 0.3, 0.4, 0.5, 9, 0.6, 0.7, 0.8])


# ------------------------------------------------------------------------------------------ allocation, by hand
def test_total_budget():
    assert total_budget(0.2, 5, 576) == 576 and total_budget(0.2, 5, 9) == 9 and total_budget(0.25, 5, 9) == 11
    assert total_budget(4, 5, 9) == 20  # an int keep: tokens per partition on average


def test_chunk_regions_are_the_official_reshape():
    assert chunk_regions(16, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    # the official code: spatial_distribution.reshape(n_sub, -1) (N a multiple of n_sub)
    assert torch.equal(chunk_regions(576, 6), torch.arange(6).repeat_interleave(96))
    assert chunk_regions(9, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]  # floor(t * 4 / 9) when not a multiple


def test_spatial_regions_by_hand():
    boxes = {0: (0, 0, 3, 4), 1: (0, 4, 3, 8), 2: (3, 0, 6, 4), 3: (3, 4, 6, 8)}  # 2 x 2 crops, 6 x 8 grid
    assert spatial_regions((4, 4), (6, 8), boxes).view(4, 4).tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [2, 2, 3, 3],
    ]
    # the bottom crops were padding only (no box): the kept top crops cover the whole picture
    top = spatial_regions((4, 4), (3, 8), {0: (0, 0, 3, 4), 1: (0, 4, 3, 8)})
    assert top.view(4, 4).tolist() == [[0, 0, 1, 1]] * 4
    # a 3 x 3 grid over a 4 x 6 grid: centres at rows 2/3, 2, 10/3 (2 is the lower crop's), columns 1, 3, 5
    wide = spatial_regions((3, 3), (4, 6), {0: (0, 0, 2, 3), 1: (0, 3, 2, 6), 2: (2, 0, 4, 3), 3: (2, 3, 4, 6)})
    assert wide.view(3, 3).tolist() == [[0, 1, 1], [2, 3, 3], [2, 3, 3]]
    assert spatial_regions((2, 2), (4, 4), {0: (0, 0, 2, 2)}).tolist() == [0, -1, -1, -1]


def test_allocation_by_hand_both_region_modes():
    # 5 partitions of 16 tokens, rate 0.2: T = 16; full image min(int(16 * 0.5), 16) = 8; sub-images share 8
    total = total_budget(0.2, 5, 16)
    chunks = chunk_regions(16, 4)  # top-8 tokens by chunk: 0 0 0 0 1 1 2 3 -> counts 4 2 1 1
    full, sub = allocate(SCORES, chunks, 4, total, 0.5)
    assert (full, sub.tolist()) == (8, [4, 2, 1, 1])
    boxes = {0: (0, 0, 3, 4), 1: (0, 4, 3, 8), 2: (3, 0, 6, 4), 3: (3, 4, 6, 8)}
    spatial = spatial_regions((4, 4), (6, 8), boxes)  # top-8 by crop: 0 0 1 1 0 0 2 2 -> counts 4 2 2 0
    full, sub = allocate(SCORES, spatial, 4, total, 0.5)
    assert (full, sub.tolist()) == (8, [4, 2, 2, 0])


def test_allocation_floors_clamps_and_edge_cases():
    regions = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3])
    # alpha 0.5, T = 15: full 7; the top 8 tokens 0..5, 8, 12 -> counts 3 3 0 2; S = 8: floor(24 / 8) = 3 ...
    full, sub = allocate(SCORES, regions, 4, 15, 0.5)
    assert (full, sub.tolist()) == (7, [3, 3, 0, 2])
    # T = 14: full 7, S = 7: floor(21 / 8) = 2, 2, 0, floor(14 / 8) = 1; the remainder (2) is not re-spread
    assert allocate(SCORES, regions, 4, 14, 0.5)[1].tolist() == [2, 2, 0, 1]
    # alpha 0.25: full int(0.25 T); top int(16 * 0.75) = 12 tokens; a share above N is clamped to N
    full, sub = allocate(SCORES, regions, 4, 64, 0.25)  # top 12: counts 3 3 0 6 of S = 48 -> 12 12 0 24
    assert full == 16 and sub.tolist() == [12, 12, 0, 16]
    assert allocate(SCORES, torch.zeros(16, dtype=torch.long), 4, 64, 0.5)[1].tolist() == [16, 0, 0, 0]
    # alpha 1: everything to the full image, nothing to spread
    full, sub = allocate(SCORES, regions, 4, 40, 1.0)
    assert full == 16 and sub.tolist() == [0, 0, 0, 0]
    # a tiny total still keeps one full-image token; no sub-images: no shares
    assert allocate(SCORES, regions, 4, 1, 0.5)[0] == 1
    assert allocate(SCORES, regions, 0, 16, 0.5)[1].numel() == 0


# ------------------------------------------------------------------------------------------ tiny LLaVA-NeXT
@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next("llama", seed=3)


@pytest.fixture(scope="module")
def next_batch():
    return next_inputs(tiny_llava_next_processor(), QUESTIONS, IMAGES)


def top(scores, k: int) -> list[int]:
    """Indices of the k largest scores, ascending (a plain re-statement of the top-k)."""
    values = [float(v) for v in scores]
    return sorted(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def reference_kept(model, inputs, keep: float, alpha: float, regions: str) -> list[dict]:
    """Per sample (one image each), HiRED re-stated with loops on the eager attention weights of the unpatched
    tower: {crop (i, j) or None for the base: (budget asked, kept indices in the unit's raster order)}."""
    config = model.config
    h = w = config.vision_config.image_size // config.vision_config.patch_size
    n = h * w
    tower = model.model.vision_tower
    feature = config.vision_feature_layer % config.vision_config.num_hidden_layers  # -2 -> 2 of 4 (0-based)
    out = []
    for b, size in enumerate(inputs["image_sizes"].tolist()):
        nh, nw = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        pixels = inputs["pixel_values"][b][: 1 + nh * nw]
        tower.config._attn_implementation = "eager"
        try:
            with torch.no_grad():
                attentions = tower(pixels, output_attentions=True).attentions
        finally:
            tower.config._attn_implementation = "sdpa"
        early = attentions[0][:, :, 0, 1:].sum(1)  # (1 + crops, N): [CLS] row summed over heads
        late = attentions[feature][:, :, 0, 1:].sum(1)

        partitions = 1 + nh * nw
        total = int(partitions * n * keep)
        full = max(1, min(int(total * alpha), n))
        sub_total = min(total - full, (partitions - 1) * n)
        # which crop each cell of the stitched, unpadded grid came from (transformers' own unpad_image)
        rows, cols = torch.meshgrid(torch.arange(nh * h), torch.arange(nw * w), indexing="ij")
        cells = unpad_image(torch.stack([rows, cols]), size)  # (2, R, C): padded coordinates of each cell
        big_r, big_c = cells.shape[1:]
        region = []
        for t in range(n):
            if regions == "chunks":
                region.append(t * (partitions - 1) // n)
            else:  # the cell under the token's centre
                r, c = cells[:, int((t // w + 0.5) * big_r / h), int((t % w + 0.5) * big_c / w)].tolist()
                region.append(r // h * nw + c // w)
        counts = [0] * (partitions - 1)
        for t in top(early[0], int(n * (1 - alpha))):
            counts[region[t]] += 1
        units = {None: (full, top(late[0], full))}
        for i in range(nh):
            for j in range(nw):
                mine = [
                    (int(rr) - i * h) * w + int(cc) - j * w
                    for rr, cc in cells.flatten(1).T.tolist()
                    if int(rr) // h == i and int(cc) // w == j
                ]
                if not mine:
                    continue
                share = min(counts[i * nw + j] * sub_total // sum(counts), n) if sub_total > 0 else 0
                asked = min(share, len(mine))
                scores = [late[1 + i * nw + j][t] for t in mine]
                units[(i, j)] = (asked, top(scores, asked))
        out.append(units)
    return out


@pytest.mark.parametrize("regions", ["spatial", "chunks"])
@pytest.mark.parametrize("keep", [0.2, 0.45])
def test_kept_tokens_equal_eager_reference_and_oracle_logits(next_model, next_batch, regions, keep):
    model, inputs = next_model, next_batch
    expected = reference_kept(model, inputs, keep, 0.5, regions)
    full = lm_inputs(model, inputs)
    with torch.no_grad(), vtc.patched(model, "hired", keep=keep, regions=regions) as handle:
        logits = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        units = kept_by_unit(handle, "pre_llm")
        asked = dict(handle.strategy.budgets)
    for b, rows in enumerate(units):
        assert {row["crop"] for row in rows} == set(expected[b])
        for row in rows:
            budget, indices = expected[b][row["crop"]]
            assert asked[row["unit"]] == budget == len(row["kept"]), (b, row["crop"])  # realised == asked
            assert row["kept"].tolist() == indices, (b, row["crop"])
        oracle = compacted_oracle_logits(model, inputs, kept, b, full)
        assert (logits[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


def test_regions_change_the_allocation(next_model, next_batch):
    """The wide image's top-left crop: spatial and chunk regions give it different shares (keep 0.5)."""
    budgets = {}
    for regions in ("spatial", "chunks"):
        with torch.no_grad(), vtc.patched(next_model, "hired", keep=0.5, regions=regions) as handle:
            next_model(**next_batch)
            budgets[regions] = dict(handle.strategy.budgets)
    assert budgets["spatial"] != budgets["chunks"]


def test_total_per_image_within_budget(next_model, next_batch):
    with torch.no_grad(), vtc.patched(next_model, "hired", keep=0.3, alpha=0.4) as handle:
        next_model(**next_batch)
        units = kept_by_unit(handle, "pre_llm")
    for rows in units:
        total = total_budget(0.3, 5, 9)  # 5 partitions of 3 x 3 tokens
        base = next(r for r in rows if r["role"] == "base")
        assert len(base["kept"]) == min(int(total * 0.4), 9)
        assert sum(len(r["kept"]) for r in rows) <= total


def test_keep_one_is_identity(next_model, next_batch):
    assert_keep_one_is_identity(next_model, next_batch, "hired")
    assert_keep_one_is_identity(next_model, next_batch, "hired", regions="chunks")


def test_generate_with_cache_equals_recompute(next_model, next_batch):
    model, inputs = next_model, next_batch
    eos = model.config.text_config.eos_token_id
    with torch.no_grad(), vtc.patched(model, "hired", keep=0.3) as handle:
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        handle.reuse_selection = True
        recomputed = greedy_recompute(model, inputs, 4, VISION_KEYS)
    assert until_eos(cached, eos) == until_eos(recomputed, eos)


def test_batch_equals_each_sample_alone(next_model, next_batch):
    processor = tiny_llava_next_processor()
    with torch.no_grad(), vtc.patched(next_model, "hired", keep=0.3) as handle:
        out = next_model(**next_batch).logits
        kept = handle.last_kept()
        for b in (0, 2):  # the wide and the tall image (unpadded crops)
            alone = next_inputs(processor, [QUESTIONS[b]], [IMAGES[b]])
            out_b = next_model(**alone).logits
            assert torch.equal(handle.last_kept()[0], kept[b])
            assert (out[b, -out_b.shape[1] :] - out_b[0]).abs().max() <= 1e-5


def test_unpatch_restores_exactly(next_model, next_batch):
    model = next_model
    with torch.no_grad():
        ref = model(**next_batch).logits
    hooks, attributes = hook_count(model), instance_attributes(model)
    with torch.no_grad():
        handle = vtc.patch(model, "hired")
        assert model(**next_batch).logits.shape != ref.shape
        handle.unpatch()
        assert torch.equal(model(**next_batch).logits, ref)
    assert hook_count(model) == hooks and instance_attributes(model) == attributes


# ------------------------------------------------------------------------------------------ other adapters
def test_llava_single_partition_rule():
    """LLaVA-1.5: one partition per image, top int(N * rate) by feature-layer [CLS] attention, noted."""
    model, processor = tiny_llava("llama", seed=5), tiny_llava_processor()
    inputs = llava_inputs(processor, QUESTIONS[:2], [[make_image(0)], [make_image(1)]])
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attn = tower(inputs["pixel_values"], output_attentions=True).attentions[2][:, :, 0, 1:].sum(1)
    finally:
        tower.config._attn_implementation = "sdpa"
    with torch.no_grad(), vtc.patched(model, "hired", keep=0.2) as handle:
        logits = model(**inputs).logits
        kept = handle.last_kept("pre_llm")
        report = str(handle.report())
    assert SINGLE_PARTITION_NOTE in report
    for b in range(2):
        k = int(36 * 0.2)
        assert kept[b].tolist() == sorted(attn[b].argsort(descending=True)[:k].tolist())
        with torch.no_grad():
            oracle = pre_llm_oracle_logits(model, inputs, kept, b)
        assert (logits[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


def test_refused_without_cls_token():
    onevision = tiny_llava_onevision("qwen2", seed=0)
    qwen = tiny_qwen_vl("qwen2_vl", seed=0)
    for model in (onevision, qwen):
        with pytest.raises(ValueError, match=r"\[CLS\]"):
            vtc.patch(model, "hired")
        with pytest.raises(ValueError, match=r"\[CLS\]"):
            vtc.patch(model, ["hired", "fastv"], keep=0.2)
        assert "forward" not in vars(model.model.language_model)
    inputs = qwen_inputs(tiny_qwen_processor(), ["What?"], images=[[make_image(0, size=56)]])
    with torch.no_grad():
        qwen(**inputs)  # left unpatched: it still runs


def test_bad_options():
    model = tiny_llava("llama", seed=5)
    with pytest.raises(ValueError, match="regions"):
        vtc.patch(model, "hired", regions="rows")
    with pytest.raises(ValueError, match="alpha"):
        vtc.patch(model, "hired", alpha=1.5)
    assert "forward" not in vars(model.model.language_model)
