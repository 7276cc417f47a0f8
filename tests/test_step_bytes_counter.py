"""``benchmarks/deltakv_step_bytes_hf.py``'s byte counter against bytes computed by hand: an interpreted Triton
kernel's masked loads and stores (``deltakv_pick_scores``: a row's positions, its offset, the gathered scores) and
aten ops (an elementwise op reads its inputs and writes its output; a gather reads its index and what it fetches)."""

import sys
from pathlib import Path

import pytest
import torch

from sparse_hf.kernels.dispatch import HAS_TRITON, is_interpreted

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreted on CPU)")
def test_counts_a_kernels_touched_bytes_and_aten_ops():
    from deltakv_step_bytes_hf import ByteCounter

    from sparse_hf.kernels.deltakv_pick import _pick_scores_kernel, deltakv_pick_scores
    if not is_interpreted(_pick_scores_kernel):
        pytest.skip("needs TRITON_INTERPRET=1 before sparse_hf.kernels is imported")
    B, L, N = 2, 300, 100
    scores = torch.randn(B, L)
    comp_pos = torch.arange(N, dtype=torch.int32).repeat(B, 1)
    comp_pos[1, 60:] = -1                                   # row 1 holds 60 tokens
    offset = torch.tensor([[0], [7]])
    counter = ByteCounter()
    counter.hook_interpreter()
    with counter:
        deltakv_pick_scores(scores, comp_pos, offset, backend="triton")
        doubled = scores * 2                                # one [B, L] input read, one output written
        picked = scores.gather(1, comp_pos.long().clamp(min=0))
    key = ("model", "triton _pick_scores_kernel")
    # per row: N positions (int32), the offset (int64) once per program (one program of 1024 per row), and one fp32
    # score per held token; written: N fp32 per row
    assert counter.read[key] == B * N * 4 + B * 8 + (N + 60) * 4
    assert counter.written[key] == B * N * 4
    assert counter.read[("model", "mul")] == B * L * 4 and counter.written[("model", "mul")] == B * L * 4
    assert counter.read[("model", "gather")] == B * N * 8 + B * N * 4          # the index, and what it fetches
    assert counter.written[("model", "gather")] == B * N * 4
    assert doubled.shape == (B, L) and picked.shape == (B, N)
