"""The paged prefill kernel (sparse_hf.kernels.paged_prefill) against its torch reference, the engine's SDPA path
(``chunk_attention`` over gathered slots) and a naive float64 loop.

On CPU the Triton kernel runs under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); ``config`` forces
small tiles so that segments span several query tiles and both key loops (unmasked and diagonal) run.
"""

import pytest
import torch

from sparse_hf.engine.attention import chunk_attention
from sparse_hf.kernels import HAS_TRITON, paged_prefill_attention, paged_prefill_attention_ref
from sparse_hf.kernels.paged_prefill import launch_config, prefill_tiles

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
HEADS = [(6, 2), (4, 4), (4, 1)]          # (H, Hkv): GQA, MHA, MQA
SMALL_TILES = (16, 16, 4, 2)


def make_case(H, Hkv, D, segments, dtype=torch.float32, slots=300, seed=0):
    """A pool of ``slots`` random K/V, random (permuted) slot tables and packed queries for ``segments``."""
    g = torch.Generator().manual_seed(seed)
    rows = max(s[0] for s in segments) + 1
    width = max(s[3] for s in segments) + 3
    k = torch.randn(slots, Hkv, D, generator=g).to(DEV, dtype)
    v = torch.randn(slots, Hkv, D, generator=g).to(DEV, dtype)
    tables = torch.stack([torch.randperm(slots, generator=g)[:width] for _ in range(rows)]).int().to(DEV)
    T = max(s[1] + s[2] for s in segments)
    q = torch.randn(T, H, D, generator=g).to(DEV, dtype)
    return q, k, v, tables


def naive(q, k, v, tables, segments, scale):
    """Per query and head, a float64 softmax over the keys it sees."""
    T, H, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for row, start, n, context in segments:
        slots = tables[row, :context].long().cpu()
        for i in range(n):
            seen = slots[: context - n + i + 1]
            for h in range(H):
                kk, vv = k[seen, h // G].double().cpu(), v[seen, h // G].double().cpu()
                p = torch.softmax(kk @ q[start + i, h].double().cpu() * scale, 0)
                out[start + i, h] = p @ vv
    return out


# Several segments: a mid-prompt chunk, a first chunk (context == length), a single token, odd lengths.
SEGMENTS = [(1, 0, 37, 90), (0, 37, 19, 19), (2, 56, 1, 45), (3, 57, 33, 34)]


@needs_triton
@pytest.mark.parametrize("H,Hkv", HEADS)
def test_kernel_matches_naive_and_reference(H, Hkv):
    q, k, v, tables = make_case(H, Hkv, 16, SEGMENTS)
    want = naive(q, k, v, tables, SEGMENTS, 0.3)
    got = paged_prefill_attention(q, k, v, tables, SEGMENTS, 0.3, backend="triton", config=SMALL_TILES)
    ref = paged_prefill_attention_ref(q, k, v, tables, SEGMENTS, 0.3)
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ref.double().cpu(), want, atol=2e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_kernel_matches_sdpa_chunk_attention(dtype, tol):
    """Each segment equals the engine's SDPA path on the gathered slots (default tiles and small ones)."""
    H, Hkv, D = 8, 2, 32
    q, k, v, tables = make_case(H, Hkv, D, SEGMENTS, dtype=dtype, seed=1)
    for config in (None, SMALL_TILES):
        got = paged_prefill_attention(q, k, v, tables, SEGMENTS, D ** -0.5, backend="triton", config=config)
        assert got.dtype == dtype
        for row, start, n, context in SEGMENTS:
            slots = tables[row, :context].long()
            want = chunk_attention(q[start: start + n].float(), k[slots].float(), v[slots].float(), D ** -0.5)
            torch.testing.assert_close(got[start: start + n].float(), want, atol=tol, rtol=tol)


@needs_triton
def test_head_dim_not_a_power_of_two_and_strided_query():
    """D=24 (masked head-dim lanes) and a query view with non-contiguous strides (a slice of fused QKV)."""
    H, Hkv, D = 4, 2, 24
    segs = [(0, 0, 21, 50), (1, 21, 5, 5)]
    _, k, v, tables = make_case(H, Hkv, D, segs, seed=2)
    qkv = torch.randn(26, (H + 2 * Hkv) * D, device=DEV)
    q = qkv[:, : H * D].view(26, H, D)
    assert not q.is_contiguous()
    got = paged_prefill_attention(q, k, v, tables, segs, 0.2, backend="triton", config=SMALL_TILES)
    torch.testing.assert_close(got.double().cpu(), naive(q, k, v, tables, segs, 0.2), atol=2e-5, rtol=1e-4)


@needs_triton
def test_uncovered_queries_are_zero_and_prebuilt_tiles_match():
    segs = [(0, 3, 10, 12)]
    q, k, v, tables = make_case(4, 2, 16, [(0, 0, 16, 12)], seed=3)
    block_m = launch_config(segs, q.device, SMALL_TILES)[0]
    tiles = prefill_tiles(segs, block_m, q.device)
    got = paged_prefill_attention(q, k, v, tables, segs, backend="triton", config=SMALL_TILES, tiles=tiles)
    assert got[:3].abs().max() == 0 and got[13:].abs().max() == 0
    torch.testing.assert_close(got, paged_prefill_attention_ref(q, k, v, tables, segs), atol=2e-5, rtol=1e-4)


def test_tiles_heaviest_first():
    tiles = prefill_tiles([(0, 0, 40, 40), (1, 40, 8, 100)], 16, "cpu")
    # (row, start, length, context, m0): row 1's only tile sees 100 keys, then row 0's tiles from the last.
    assert tiles[:, 0].tolist() == [1, 0, 0, 0] and tiles[:, 4].tolist() == [0, 32, 16, 0]


def test_bad_segments_and_shapes_raise():
    q, k, v, tables = make_case(4, 2, 16, [(0, 0, 8, 8)])
    for bad in ([(0, 0, 9, 8)], [(0, 0, 0, 8)], [(0, 4, 8, 20)], [(0, 0, 8, 10_000)]):
        with pytest.raises(ValueError, match="bad segment"):
            paged_prefill_attention(q, k, v, tables, bad, backend="torch")
    with pytest.raises(ValueError, match="shape mismatch"):
        paged_prefill_attention(q, k[:, :, :8], v[:, :, :8], tables, [(0, 0, 8, 8)])


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v, tables = make_case(4, 2, 16, SEGMENTS[:2])
    got = paged_prefill_attention(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), SEGMENTS[:2])
    torch.testing.assert_close(got, paged_prefill_attention_ref(q.cpu(), k.cpu(), v.cpu(), tables.cpu(),
                                                                SEGMENTS[:2]))


@pytest.mark.gpu
def test_gpu_bf16_long_chunks_match_sdpa():
    """Qwen2.5-7B head shape (28 / 4 heads, D=128), bf16, a 4K chunk on 12K of context plus a fresh 3K prompt."""
    H, Hkv, D = 28, 4, 128
    segs = [(0, 0, 4096, 12288), (1, 4096, 3001, 3001)]
    q, k, v, tables = make_case(H, Hkv, D, segs, dtype=torch.bfloat16, slots=20000, seed=4)
    got = paged_prefill_attention(q, k, v, tables, segs, D ** -0.5)
    for row, start, n, context in segs:
        slots = tables[row, :context].long()
        want = chunk_attention(q[start: start + n], k[slots], v[slots], D ** -0.5)
        torch.testing.assert_close(got[start: start + n].float(), want.float(), atol=2e-2, rtol=2e-2)
