"""Regression: per-row lengths given as a strided view.

The engine passes ``lens[g]``, a row of a ``[G, B]`` table built from a numpy fancy index (Fortran order, so the
row has stride ``G``). The Triton kernels read entry ``b`` at ``base + b``; before the fix rows ``b >= 1`` read
other groups' lengths on the GPU, so H2O (and every per-layer-group method with mixed lengths) attended the wrong
keys there. Run under ``TRITON_INTERPRET=1`` on CPU (``conftest.py``), against the torch reference."""

import numpy as np
import pytest
import torch

from sparse_hf.kernels import decode_attention_with_scores, sparse_decode_attention
from sparse_hf.kernels.dispatch import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreted on CPU)")


def strided_lengths(per_row, groups=3):
    """``per_row`` as row 1 of a ``[groups, B]`` int32 table made the engine's way (stride ``groups``)."""
    table = np.zeros((groups, 8), dtype=np.int64)
    table[1, : len(per_row)] = per_row
    lens = torch.as_tensor(table[:, list(range(len(per_row)))].astype(np.int32))[1]
    assert lens.stride() == (groups,)
    return lens


def inputs(B=3, H=4, Hkv=2, L=37, D=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
            torch.randn(B, Hkv, L, D, generator=g))


def test_decode_attention_with_scores_strided_lengths():
    q, k, v = inputs()
    lens = strided_lengths([37, 20, 5])
    ref_out, ref_scores = decode_attention_with_scores(q, k, v, lengths=lens.contiguous(), backend="torch")
    out, scores = decode_attention_with_scores(q, k, v, lengths=lens, backend="triton")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isfinite(scores), torch.isfinite(ref_scores))


def test_sparse_decode_attention_strided_num_indices():
    q, k, v = inputs()
    indices = torch.arange(37).view(1, 1, 37).expand(3, 2, 37).contiguous()
    lens = strided_lengths([37, 20, 5])
    ref = sparse_decode_attention(q, k, v, indices, num_indices=lens.contiguous(), backend="torch")
    out = sparse_decode_attention(q, k, v, indices, num_indices=lens, backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
