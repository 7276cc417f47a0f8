"""``top_priority`` (off CUDA a ``topk`` over packed ``(score, -slot)`` keys, on CUDA the stable sort of canonical
priorities) selects exactly what the rule ``priority_order`` does: same slots, same order, on ties, infinities, NaN,
signed zeros, bf16/fp16 inputs and padded batches, on every device. Timing: ``benchmarks/bench_selection_topk.py``."""

import pytest
import torch

from sparse_hf.methods import selection
from sparse_hf.methods.selection import (priority_keys, priority_order, select_keep, select_keep_static,
                                         top_priority)


def tied_scores(shape, levels=4, seed=0, dtype=torch.float32, specials=True):
    """Scores drawn from ``levels`` values (many ties), with some -inf, inf, NaN, -0.0 and 0.0 mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, shape, generator=g).float() / levels - 0.5
    if specials:
        pick = torch.rand(shape, generator=g)
        for lo, hi, value in ((0.0, 0.05, float("-inf")), (0.05, 0.08, float("inf")), (0.08, 0.10, float("nan")),
                              (0.10, 0.15, -0.0), (0.15, 0.20, 0.0), (0.20, 0.22, -float("nan"))):
            x = torch.where((pick >= lo) & (pick < hi), torch.full_like(x, value), x)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("levels", [1, 3, 50])
def test_top_priority_equals_stable_sort_prefix(dtype, levels):
    for seed in range(3):
        prio = tied_scores((2, 3, 97), levels=levels, seed=seed, dtype=dtype)
        reference = priority_order(prio)
        for k in (0, 1, 7, 40, 96, 97, 500):
            assert torch.equal(top_priority(prio, k), reference[..., :k]), (dtype, levels, seed, k)
            if dtype != torch.float64:
                assert torch.equal(_keys_topk(prio, k), reference[..., :k]), (dtype, levels, seed, k)


def test_bf16_scores_with_distinct_float32_values_rank_as_their_bf16_values():
    """Scores that round to the same bf16 value tie (the rule sees the tensor it is given, not the float32 source)."""
    src = torch.tensor([1.0, 1.001, 1.002, 0.5, 1.003])
    prio = src.to(torch.bfloat16)
    assert torch.equal(top_priority(prio, 5), priority_order(prio))
    assert top_priority(prio, 4).tolist() == [0, 1, 2, 4]


def test_priority_keys_are_distinct_and_order_like_score_then_earlier_slot():
    prio = tied_scores((4, 257), levels=5, seed=3)
    keys = priority_keys(prio)
    assert keys.dtype == torch.long
    assert all(len(set(row.tolist())) == prio.shape[-1] for row in keys)
    by_key = keys.argsort(dim=-1, descending=True)
    assert torch.equal(by_key, priority_order(prio))


def test_priority_keys_refuse_float64():
    with pytest.raises(TypeError, match="float64"):
        priority_keys(torch.zeros(3, dtype=torch.float64))


def _sort_based(prio, k):
    return priority_order(prio)[..., :min(int(k), prio.shape[-1])]


def _random_state(B=3, Hkv=2, L=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, Hkv, L, generator=g) < 0.85
    scores = tied_scores((B, Hkv, L), levels=3, seed=seed + 1, specials=False)
    num_top = torch.randint(0, 20, (B,), generator=g)
    return valid, scores, num_top


@pytest.mark.parametrize("seed", range(4))
def test_select_keep_static_and_select_keep_unchanged_against_the_sort(seed, monkeypatch):
    valid, scores, num_top = _random_state(seed=seed)
    fast_static = select_keep_static(valid, scores, 4, 6, num_top, 4 + 6 + 19)
    fast_keep = select_keep(valid, scores, 4, 6, num_top)
    monkeypatch.setattr(selection, "top_priority", _sort_based)
    slow_static = select_keep_static(valid, scores, 4, 6, num_top, 4 + 6 + 19)
    slow_keep = select_keep(valid, scores, 4, 6, num_top)
    for fast, slow in ((fast_static, slow_static), (fast_keep, slow_keep)):
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def _kept_positions(idx, ok, pad):
    """Per (row, head): the sorted logical positions of the ok entries (slot - left padding)."""
    return [[sorted((i - pad).tolist() for i, o in zip(idx[h], ok[h]) if o) for h in range(idx.shape[0])]]


def test_a_row_keeps_the_same_tokens_alone_and_in_a_left_padded_batch():
    """Every score ties (a constant), so only the tie rule decides: the earliest tokens win alone and batched."""
    lengths = (60, 45, 33)
    L = max(lengths)
    for scores_of in (lambda n, s: torch.zeros(1, 2, n),                        # all tied
                      lambda n, s: tied_scores((1, 2, n), levels=2, seed=s, specials=False)):
        rows = [scores_of(n, s) for s, n in enumerate(lengths)]
        alone = [select_keep_static(torch.ones(1, 2, n, dtype=torch.bool), r, 3, 5, 7, 3 + 5 + 7)
                 for r, n in zip(rows, lengths)]
        valid = torch.zeros(len(lengths), 2, L, dtype=torch.bool)
        batch_scores = torch.randn(len(lengths), 2, L)                          # garbage in the padding
        for b, (r, n) in enumerate(zip(rows, lengths)):
            valid[b, :, L - n:] = True
            batch_scores[b, :, L - n:] = r[0]
        idx, ok = select_keep_static(valid, batch_scores, 3, 5, 7, 3 + 5 + 7)
        for b, n in enumerate(lengths):
            got = _kept_positions(idx[b], ok[b], L - n)
            want = _kept_positions(alone[b][0][0], alone[b][1][0], 0)
            assert got == want, b
        # all tied: the middle tokens kept are the earliest candidates (slots 3..9), not the ones topk would pick
        if bool((rows[0] == 0).all()):
            assert want[0][0] == list(range(0, 10)) + list(range(lengths[-1] - 5, lengths[-1]))


def _keys_topk(prio, k):
    return priority_keys(prio).topk(min(k, prio.shape[-1]), dim=-1).indices


def test_priority_order_against_a_python_oracle_with_signed_zeros_and_nans():
    """The rule itself, written independently: decreasing value, ``-0.0 == +0.0``, every NaN equal and above
    ``inf``, ties to the earlier slot."""
    prio = tied_scores((3, 200), levels=3, seed=11)
    for row, order in zip(prio.tolist(), priority_order(prio).tolist()):
        rank = [(float("inf"), 1) if v != v else (v + 0.0, 0) for v in row]     # NaN above inf
        want = sorted(range(len(row)), key=lambda i: (-rank[i][1], -rank[i][0], i))
        assert order == want


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_selection_equals_the_cpu_rule(dtype):
    """CUDA's sort orders by bits (-0.0 < +0.0, negative NaNs lowest) and its topk breaks ties its own way; the
    canonical priorities and the packed keys make every path pick the CPU rule's slots (an H200 run of the raw
    sort differed from the CPU at the top-1 of tied scores with signed NaNs)."""
    prio = tied_scores((2, 28, 4099), levels=5, seed=7, dtype=dtype)
    for k in (1, 100, 4099):
        want = priority_order(prio)[..., :k]
        assert torch.equal(top_priority(prio.cuda(), k).cpu(), want)
        assert torch.equal(priority_order(prio.cuda())[..., :k].cpu(), want)
        assert torch.equal(_keys_topk(prio.cuda(), k).cpu(), want)
