"""Each strategy's scores and selection against an oracle built from the papers' formulas.

The oracles read the unpatched model's attention maps through `output_attentions` on an eager model:
allowed here, in tests, never in the library."""

import pytest
import torch

import vtc
from vtc.strategies.base import VisualTokens
from vtc.strategies.fopru import FoPru
from vtc.testing import tiny_llava


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava("llama", seed=11, attn_implementation="eager", vision_layers=6)


@pytest.fixture(scope="module")
def vision_attentions(eager_model, single):
    with torch.no_grad():
        out = eager_model.model.vision_tower(single["pixel_values"], output_attentions=True)
    return out.attentions  # per encoder layer: (1, heads, 1 + 36, 1 + 36)


@pytest.mark.parametrize("start_layer,keep", [(None, 0.25), (2, 6), (4, 0.5)])
def test_vtc_cls_equals_formula(eager_model, vision_attentions, single, start_layer, keep):
    # feature layer = vision_feature_layer -2 -> encoder layer 4 of 0..5; default start = round(16/24 * 6) = 4
    start = 4 if start_layer is None else start_layer
    score = sum(vision_attentions[layer][0, :, 0, 1:].mean(0) for layer in range(start, 5))
    k = keep if isinstance(keep, int) else round(36 * keep)
    expected = score.topk(k).indices.sort().values
    with torch.no_grad(), vtc.patched(eager_model, "vtc_cls", keep=keep, start_layer=start_layer) as handle:
        eager_model(**single)
        assert torch.equal(handle.last_kept()[0], expected)


def test_fopru_rank_equals_formula(eager_model, vision_attentions, single):
    received = vision_attentions[4][0, :, 1:, 1:].mean(0).mean(0)  # patch queries, patch keys
    expected = received.topk(9).indices.sort().values
    with torch.no_grad(), vtc.patched(eager_model, "fopru", keep=0.25) as handle:
        eager_model(**single)
        assert torch.equal(handle.last_kept()[0], expected)


def test_fopru_row_mode_keeps_whole_rows_then_fills_from_the_next_row():
    scores = torch.tensor(
        [
            [0.1, 0.1, 0.1, 0.1],  # row 0: sum 0.4
            [0.9, 0.0, 0.0, 0.0],  # row 1: sum 0.9 (one strong token)
            [0.3, 0.3, 0.3, 0.3],  # row 2: sum 1.2
            [0.2, 0.25, 0.2, 0.1],  # row 3: sum 0.75
        ]
    )

    class Fixed(FoPru):
        def score(self, visual):
            return scores.reshape(1, -1)

    visual = VisualTokens(features=torch.zeros(1, 16, 2), grid=(4, 4), budget=6)
    kept = Fixed(keep=6, mode="row").select(visual)[0].tolist()
    # rows 2 (whole) then the 2 best tokens of row 1 (0.9, then the lowest index among the zeros)
    assert kept == [4, 5, 8, 9, 10, 11]
    assert Fixed(keep=6, mode="rank").select(visual)[0].tolist() == [4, 8, 9, 10, 11, 13]


def test_fopru_row_mode_runs_on_the_model(eager_model, single):
    with torch.no_grad(), vtc.patched(eager_model, "fopru", keep=12, mode="row") as handle:
        eager_model(**single)
        kept = handle.last_kept()[0]
    rows = kept // 6
    assert len(kept) == 12 and len(rows.unique()) == 2  # two whole rows of the 6x6 grid
