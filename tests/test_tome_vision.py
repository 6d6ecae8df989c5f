"""ToMe inside the vision tower (`vtc.patch(model, "tome", placement="vision")`, Bolya et al., ICLR 2023):
the merging against the official algorithm re-stated on a hand-built CLIP tower (tome/patch/timm.py and
tome/merge.py: attention with proportional attention, keys averaged over heads as the metric, bipartite
soft matching with the [CLS] protected, size-weighted merge, the [unmerged A, B] order), the LLM fed the
merged tokens at their representatives' positions, and the DESIGN.md invariants (r = 0 identity, cache vs
recompute, batch vs alone, exact unpatch, refusal elsewhere)."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import vtc
from vtc.adapters.vit_merge import TowerMerge, merge_probe
from vtc.strategies.tome import vision_schedule
from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor
from vtc.testing.llava_next import tiny_llava_next

from .helpers import full_embeds, greedy_recompute, hook_count, instance_attributes, kept_rows, until_eos

QUESTIONS = ["What is in the image?", "How many objects are there? Answer with one word."]


def encoder_layers(tower):
    return getattr(tower, "vision_model", tower).encoder.layers


def official_tome(tower, pixels: torch.Tensor, schedule: list[int], prop_attn: bool) -> list[dict]:
    """The official ToMe block re-stated on an HF CLIP tower, one image at a time, in ToMe's token order.

    Per image: "states" (the input of layer 0, then every layer's output: (n_l, D) merged tokens), "source"
    per state ((n_l, N) 0/1: which original tokens each merged token holds), "rep" (original index of each
    token's representative: the surviving B token), "size" (n_l,) of the last state."""
    vision = getattr(tower, "vision_model", tower)
    out = []
    for image in pixels:
        x = vision.pre_layrnorm(vision.embeddings(image[None]))[0]
        n0 = x.shape[0]
        size, source, rep = torch.ones(n0, 1), torch.eye(n0), list(range(n0))
        states, sources = [x], [source]
        for layer, r in zip(vision.encoder.layers, schedule + [0] * len(vision.encoder.layers)):
            attn = layer.self_attn
            heads, dim = attn.num_heads, attn.head_dim
            h = layer.layer_norm1(x)
            q, k, v = (proj(h).view(-1, heads, dim).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            logits = q @ k.transpose(-1, -2) * attn.scale
            if prop_attn:
                logits = logits + size.log()[:, 0][None, None, :]
            x = x + attn.out_proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, heads * dim))
            r = min(r, (x.shape[0] - 1) // 2)
            if r > 0:  # bipartite_soft_matching(metric, r, class_token=True) + merge_wavg
                metric = k.mean(0)
                metric = metric / metric.norm(dim=-1, keepdim=True)
                scores = metric[::2] @ metric[1::2].T
                scores[0, :] = -float("inf")
                node_max, node_idx = scores.max(dim=-1)
                edge = node_max.argsort(descending=True)
                unm, src = edge[r:].sort().values, edge[:r]
                dst = node_idx[src]

                def merge(t, unm=unm, src=src, dst=dst):
                    a, b = t[::2], t[1::2]
                    return torch.cat([a[unm], b.index_add(0, dst, a[src])])

                weighted, size_new = merge(x * size), merge(size)
                x, size, source = weighted / size_new, size_new, merge(source)
                rep = [rep[::2][i] for i in unm.tolist()] + rep[1::2]
            x = x + layer.mlp(layer.layer_norm2(x))
            states.append(x)
            sources.append(source)
        out.append(dict(states=states, sources=sources, rep=rep, size=size[:, 0]))
    return out


def tiny_tower(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=84, patch_size=14
    )
    return CLIPVisionModel(config).eval()


# ------------------------------------------------------------------------------------------ the merge itself
def test_schedule_from_keep():
    assert vision_schedule(36, 9, 3) == [9, 9, 9]
    assert vision_schedule(576, 64, 23) == [23] * 6 + [22] * 17  # ceil of what is left over the layers left
    assert sum(vision_schedule(576, 144, 23)) == 576 - 144
    assert vision_schedule(36, 2, 3) == [12, 11, 6]  # at most half per layer: 7 tokens stay
    assert vision_schedule(36, 36, 3) == [0, 0, 0]


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("schedule", [[5, 4, 3, 2], [0, 18, 0, 9], [40, 40, 40, 40]])
def test_tower_merge_equals_official_tome(schedule, prop_attn):
    tower = tiny_tower()
    pixels = torch.randn(2, 3, 84, 84)
    expected = official_tome(tower, pixels, schedule, prop_attn)
    reported = {}
    merger = TowerMerge(
        encoder_layers(tower),
        {"schedule": schedule, "prop_attn": prop_attn, "layer": 2},
        lambda state: reported.update(probe=merge_probe(state, drop_cls=False)),
    )
    try:
        with torch.no_grad():
            hidden = tower(pixels, output_hidden_states=True).hidden_states
    finally:
        merger.remove()
    for b, ref in enumerate(expected):
        for layer, (state, source) in enumerate(zip(ref["states"], ref["sources"])):
            # every original token carries the merged token that holds it (the layer's expanded output)
            holder = source.argmax(dim=0)
            assert bool((source.sum(0) == 1).all())
            assert torch.allclose(hidden[layer][b], state[holder], atol=1e-5), (b, layer)
    # the probe after layer 2: representatives and sizes of the merged tokens
    ref = official_tome(tower, pixels, schedule[:3], prop_attn)
    for b, r in enumerate(ref):
        probe = reported["probe"][b]
        assert sorted(probe[0].nonzero().squeeze(1).tolist()) == sorted(r["rep"])
        assert torch.equal(probe[1][r["rep"]], r["size"])
        assert int(probe[1].sum()) == 37


def test_zero_r_tower_is_exact_and_remove_restores():
    tower = tiny_tower()
    pixels = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        ref = tower(pixels, output_hidden_states=True).hidden_states
    attributes, hooks = instance_attributes(tower), hook_count(tower)
    merger = TowerMerge(
        encoder_layers(tower),
        {"schedule": [0] * 4, "prop_attn": True, "layer": 2},
        print,
    )
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    merger.remove()
    assert instance_attributes(tower) == attributes and hook_count(tower) == hooks


# ------------------------------------------------------------------------------------------ tiny LLaVA
@pytest.fixture(scope="module")
def model():
    return tiny_llava("llama", seed=11)


@pytest.fixture(scope="module")
def batch():
    return llava_inputs(tiny_llava_processor(), QUESTIONS, [[make_image(0)], [make_image(1)]])


def test_r_zero_is_identity(model, batch):
    with torch.no_grad():
        ref = model(**batch).logits
        with vtc.patched(model, "tome", placement="vision", r=0):
            out = model(**batch).logits
    valid = batch["attention_mask"].bool()
    assert out.shape == ref.shape and (out - ref)[valid].abs().max() <= 1e-5


@pytest.mark.parametrize("options", [dict(r=4), dict(keep=0.25), dict(r=[8, 4, 2], prop_attn=False)])
def test_llm_sees_the_merged_tokens_at_their_representatives(model, batch, options):
    """Oracle: the official merge re-stated on the unpatched tower, projected, placed at the representatives'
    positions in the unpatched language model."""
    with torch.no_grad(), vtc.patched(model, "tome", placement="vision", **options) as handle:
        logits = model(**batch).logits
        kept = handle.last_kept("pre_llm")
        schedule = handle.adapter._hooks[-1].schedule
    assert schedule[3] == 0  # nothing merges after the feature layer (2 of 4)
    if options.get("keep") == 0.25:
        assert [len(k) for k in kept] == [9, 9]
    tower = model.model.vision_tower
    with torch.no_grad():
        embeds, visual = full_embeds(model, batch)
        merged = official_tome(tower, batch["pixel_values"], schedule, options.get("prop_attn", True))
        for b, ref in enumerate(merged):
            reps = torch.tensor(ref["rep"])
            order = reps.argsort()
            tokens, reps = ref["states"][3][order][1:], reps[order][1:]  # raster order, [CLS] dropped
            assert kept[b].tolist() == (reps - 1).tolist()
            rows = kept_rows(batch, visual, kept, b)
            sample = embeds[b].clone()
            sample[visual[b].nonzero().squeeze(1)[reps - 1]] = model.model.multi_modal_projector(tokens)
            out = model.model.language_model(
                inputs_embeds=sample[rows][None],
                position_ids=rows[None],
                attention_mask=torch.ones(1, len(rows), dtype=torch.long),
                use_cache=False,
            )
            oracle = model.lm_head(out.last_hidden_state)[0]
            assert (logits[b, -len(oracle) :] - oracle).abs().max() <= 1e-5


def test_generate_with_cache_equals_recompute(model, batch):
    eos = model.config.text_config.eos_token_id
    with torch.no_grad(), vtc.patched(model, "tome", placement="vision", keep=0.25) as handle:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        handle.reuse_selection = True
        recomputed = greedy_recompute(model, batch, 4)
    assert until_eos(cached, eos) == until_eos(recomputed, eos)


def test_batch_equals_each_sample_alone(model, batch):
    processor = tiny_llava_processor()
    with torch.no_grad(), vtc.patched(model, "tome", placement="vision", r=5) as handle:
        out = model(**batch).logits
        kept = handle.last_kept()
        for b in range(2):
            alone = llava_inputs(processor, [QUESTIONS[b]], [[make_image(b)]])
            out_b = model(**alone).logits
            assert torch.equal(handle.last_kept()[0], kept[b])
            assert (out[b, -out_b.shape[1] :] - out_b[0]).abs().max() <= 1e-5


def test_unpatch_restores_exactly(model, batch):
    with torch.no_grad():
        ref = model(**batch).logits
    hooks, attributes = hook_count(model), instance_attributes(model)
    with torch.no_grad():
        handle = vtc.patch(model, "tome", placement="vision", r=6)
        assert "forward" in vars(encoder_layers(model.model.vision_tower)[0])
        assert model(**batch).logits.shape != ref.shape
        handle.unpatch()
        assert torch.equal(model(**batch).logits, ref)
    assert hook_count(model) == hooks and instance_attributes(model) == attributes


def test_refusals_and_bad_options(model):
    next_model = tiny_llava_next("llama", seed=0)
    with pytest.raises(NotImplementedError, match="placement='pre_llm'"):
        vtc.patch(next_model, "tome", placement="vision")
    assert "forward" not in vars(next_model.model.language_model)
    with pytest.raises(ValueError, match="placement"):
        vtc.patch(model, "tome", placement="tower")
    with pytest.raises(ValueError, match="needs placement='vision'"):
        vtc.patch(model, "tome", r=4)
    with pytest.raises(ValueError, match="int >= 0"):
        vtc.patch(model, "tome", placement="vision", r=-1)
    with pytest.raises(ValueError, match="4 layers"):
        vtc.patch(model, "tome", placement="vision", r=[1] * 5)
    assert "forward" not in vars(model.model.language_model)
    assert "forward" not in vars(encoder_layers(model.model.vision_tower)[0])
