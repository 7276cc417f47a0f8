"""``range_softmax_max`` (two Triton passes, interpreted on CPU) against OmniKV's torch scores
(``omnikv_decode_scores`` with the sink/recent candidate mask of a position-ordered row)."""

import pytest
import torch

from sparse_hf.kernels.dispatch import HAS_TRITON
from sparse_hf.kernels.omnikv_scores import range_softmax_max, range_softmax_max_kernel_runs
from sparse_hf.methods.omnikv import omnikv_decode_scores
from sparse_hf.methods.selection import sink_recent_candidates

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreted on CPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"            # the real kernels on a GPU machine


def expected(logits, lens, sink, recent):
    B, H, L = logits.shape
    valid = torch.arange(L).view(1, L) < lens.view(-1, 1)
    _, _, cand = sink_recent_candidates(valid.unsqueeze(1), sink, recent)
    return omnikv_decode_scores(logits, cand[:, 0])


@pytest.mark.parametrize("split_size,block", [(64, 16), (8192, 32)])
def test_equals_the_torch_scores(split_size, block):
    g = torch.Generator().manual_seed(0)
    B, H, L, sink, recent = 4, 6, 150, 4, 8
    lens = torch.tensor([150, 97, 13, 5])           # the last two rows: few candidates, then none
    logits = torch.randn(B, H, L, generator=g) * 4
    logits = logits.masked_fill(torch.arange(L).view(1, 1, L) >= lens.view(-1, 1, 1), float("-inf"))
    got = range_softmax_max(logits.to(DEVICE), sink, (lens - recent).to(DEVICE), split_size=split_size,
                            block=block).cpu()
    want = expected(logits, lens, sink, recent)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-7)
    assert not finite[3].any()


def test_dispatch_and_bad_input():
    logits = torch.zeros(1, 2, 8, device=DEVICE)
    assert not range_softmax_max_kernel_runs(logits, "torch")
    assert range_softmax_max_kernel_runs(logits, "auto") == (DEVICE == "cuda")   # CPU tensors: the torch path
    assert range_softmax_max_kernel_runs(logits, "triton")
    with pytest.raises(ValueError, match="float32"):
        range_softmax_max(logits.double(), 0, torch.tensor([8]))


def test_a_start_per_row_equals_the_torch_scores():
    # left-padded rows (the HF path): row b's valid slots are [pad_b, L), its candidates [pad_b + sink, L - recent)
    g = torch.Generator().manual_seed(1)
    B, H, L, sink, recent = 4, 6, 150, 4, 8
    pad = torch.tensor([0, 37, 130, 146])          # the last two rows: few candidates, then none
    logits = torch.randn(B, H, L, generator=g) * 4
    valid = torch.arange(L).view(1, L) >= pad.view(-1, 1)
    logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    _, _, cand = sink_recent_candidates(valid.unsqueeze(1), sink, recent)
    want = omnikv_decode_scores(logits, cand[:, 0])
    got = range_softmax_max(logits.to(DEVICE), (pad + sink).to(DEVICE), torch.full((B,), L - recent).to(DEVICE),
                            split_size=64, block=16).cpu()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-7)
    assert finite[0].any() and finite[2].any() and not finite[3].any()


@pytest.mark.parametrize("per_row_start", [False, True])
def test_the_second_pass_block_does_not_change_a_bit(per_row_start):
    # MAX_PASS_BLOCK (256) replaced 1024, the first pass's block, as the second pass's slots per program: the same
    # scores, bit for bit, at any second-pass block (only which program computes a slot changes)
    g = torch.Generator().manual_seed(2)
    B, H, L, sink, recent = 3, 5, 1300, 4, 8
    lens = torch.tensor([1300, 777, 9])
    logits = (torch.randn(B, H, L, generator=g) * 4).masked_fill(
        torch.arange(L).view(1, 1, L) >= lens.view(-1, 1, 1), float("-inf")).to(DEVICE)
    lo = torch.tensor([4, 21, 4]).to(DEVICE) if per_row_start else sink
    hi = (lens - recent).to(DEVICE)
    before = range_softmax_max(logits, lo, hi, split_size=512, block=128, max_block=128)   # one block, as before
    for max_block in (16, 64, 256, 1024):
        assert torch.equal(range_softmax_max(logits, lo, hi, split_size=512, block=128, max_block=max_block), before)
    assert torch.isfinite(before[0]).sum() == L - sink - recent
