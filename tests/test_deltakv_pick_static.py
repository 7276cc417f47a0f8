"""``DeltaKV.pick_static``'s count-budget shortcut (one fill for ``keep`` when the budget covers every rank) against
the general masks it replaced (under it the picks are the same set in any order: no sort), and the fraction-budget
path unchanged."""

import pytest
import torch

from sparse_hf.config import resolve_counts
from sparse_hf.methods import get_method


def general_keep(budget, width, length, padding, held):
    """The masks ``pick_static`` computed for every budget before the shortcut (the reference)."""
    B = padding.shape[0]
    top = resolve_counts(budget, length.expand(B))
    per_row = resolve_counts(budget, length - padding)
    rank = torch.arange(width).view(1, width)
    return (rank < per_row.view(B, 1)) | (top >= held).view(B, 1)


def method(budget):
    cls = get_method("deltakv")
    config, _ = cls.build_config(num_top_tokens=budget)
    return cls(config, num_layers=4)


@pytest.mark.parametrize("budget,width", [(64, 64), (64, 40), (400, 400), (0.1, 50), (0.25, 90)])
def test_keep_equals_the_general_masks(budget, width):
    g = torch.Generator().manual_seed(width)
    B, N = 3, 400
    scores = torch.randn(B, N, generator=g)
    scores[:, 300:] = float("-inf")                               # a reserved tail
    m = method(budget)
    for length, padding, held in [(torch.tensor([420]), torch.tensor([0, 5, 77]), torch.tensor([300])),
                                  (torch.tensor([520]), torch.tensor([0, 0, 0]), None)]:
        pick, keep = m.pick_static(scores, width, length, padding, held)
        best_first = scores.topk(width, dim=-1).indices
        if isinstance(budget, float):                             # ranks are masked: best first, as topk
            assert torch.equal(pick, best_first)
        else:                                                     # every rank read: the same set, any order
            assert torch.equal(pick.sort(-1).values, best_first.sort(-1).values)
        want = general_keep(budget, width, length, padding, N if held is None else held)
        assert keep.dtype == torch.bool and torch.equal(keep, want)
        if not isinstance(budget, float):
            assert keep.all()                                     # what the shortcut returns without computing
        elif padding.any():
            assert not keep.all()                                 # a padded row's own fraction cuts some ranks
