"""The Triton ``attention_mass`` (H2O's accumulated attention, two passes over the keys) against the torch reference
and a float64 computation: GQA, query blocks that straddle the causal boundary, invalid keys and queries, rows of
different lengths, chunks that attend to earlier slots, a slot table, bf16, and the split-K / split-row merges.
Under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py), on CUDA in the ``gpu`` test."""

import os

import pytest
import torch

from sparse_hf.kernels import (HAS_TRITON, attention_mass, attention_mass_ref, decode_attention_mass,
                               decode_attention_mass_ref)
from sparse_hf.kernels.attention_mass import MASS_CONFIG, MassConfig, mass_config

needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1")


def make_case(B=2, H=8, Hkv=2, q=24, L=70, D=32, offset=None, dtype=torch.float32, seed=0, device="cpu"):
    """Queries are the last ``q`` of ``L`` columns (``offset`` ``L - q`` by default: a chunk that sees earlier
    slots); row ``b`` has ``L - 9 * b`` real keys (left padding invalid), one KV head drops a few more keys."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, H, q, D, generator=g).to(device, dtype)
    keys = torch.randn(B, Hkv, L, D, generator=g).to(device, dtype)
    offset = L - q if offset is None else offset
    key_pos = torch.arange(L, device=device).expand(B, Hkv, L)
    key_valid = torch.ones(B, Hkv, L, dtype=torch.bool, device=device)
    for b in range(B):
        key_valid[b, :, :9 * b] = False                               # shorter rows: left padding
    key_valid[:, -1, 3:7] = False                                      # a KV head with evicted keys
    query_pos = torch.arange(offset, offset + q, device=device)
    query_valid = torch.ones(B, q, dtype=torch.bool, device=device)
    query_valid[-1, :5] = False
    return queries, keys, key_pos, key_valid, query_pos, query_valid


def float64_mass(queries, keys, key_pos, key_valid, query_pos, query_valid, scaling):
    """Per query and head, a plain loop in float64 (independent of the reference's blocked formula)."""
    B, H, q, D = queries.shape
    Hkv, L = keys.shape[1:3]
    G = H // Hkv
    mass = torch.zeros(B, Hkv, L, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kvh = h // G
            for i in range(q):
                if query_valid is not None and not query_valid[b, i]:
                    continue
                allowed = key_valid[b, kvh].cpu() & (key_pos[b, kvh].cpu() <= int(query_pos[i]))
                if not allowed.any():
                    continue
                s = keys[b, kvh].cpu().double() @ queries[b, h, i].cpu().double() * scaling
                s = s.masked_fill(~allowed, float("-inf"))
                mass[b, kvh] += torch.softmax(s, 0)
    return mass


@needs_triton
@pytest.mark.parametrize("kwargs", [
    dict(),                                                            # G = 4, chunk after 46 earlier slots
    dict(H=6, Hkv=2, q=70, L=70, offset=0),                            # the whole prompt, G = 3 (not a power of 2)
    dict(B=1, H=4, Hkv=4, q=1, L=150),                                 # one decode query, G = 1
    dict(B=3, H=4, Hkv=1, q=50, L=200, D=24, offset=100),              # keys after the last query: never seen
])
def test_kernel_equals_reference_and_float64(kwargs):
    case = make_case(**kwargs)
    ref = attention_mass_ref(*case, 0.3)
    got = attention_mass(*case, 0.3, backend="triton")
    exact = float64_mass(*case, 0.3)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-5)


@needs_triton
def test_query_blocks_straddle_the_causal_boundary_and_splits_merge():
    """Several row blocks and key tiles on both sides of the diagonal, with pass 1 split over keys and pass 2 over
    query rows (the merges the GPU picks for few long rows)."""
    case = make_case(B=1, H=4, Hkv=2, q=90, L=300, offset=150)
    ref = float64_mass(*case, 0.2)
    for key_split, row_split in ((None, None), (64, 64), (100, 50), (17, 33)):
        got = attention_mass(*case, 0.2, backend="triton", key_split=key_split, row_split=row_split)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


#: Forced small pass-2 tiles ``(block_rows, block_keys, num_warps, num_stages)``: neither q nor L below is a
#: multiple of them, so every loop has a partial last block.
SMALL_TILES = [(16, 16, 4, 1), (16, 32, 2, 3), (32, 16, 4, 2)]


@needs_triton
@pytest.mark.parametrize("config", SMALL_TILES)
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (6, 2)])                # G = 1, 2, 3
def test_small_tiles_equal_float64(config, H, Hkv):
    """Pass 2 at forced small tiles (after pass 1): G = 1/2/3 query heads per KV head, a chunk after earlier slots,
    left-padded rows, evicted keys, invalid queries, q = 37 and L = 83 not multiples of any tile; and queries split
    at a size that is not a multiple of the tile either (the split merge)."""
    case = make_case(B=2, H=H, Hkv=Hkv, q=37, L=83, D=16)
    want = float64_mass(*case, 0.3)
    for row_split in (None, 21):
        got = attention_mass(*case, 0.3, backend="triton", config=config, row_split=row_split)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("config", [(16, 16, 4, 1), None])
def test_unsorted_query_positions(config):
    """Query positions out of order (each key tile's loop starts at the first query whose running-max position may
    see it, so later queries that see less must still be masked exactly), with repeated positions."""
    queries, keys, key_pos, key_valid, _, query_valid = make_case(B=2, H=6, Hkv=2, q=40, L=70, D=16)
    g = torch.Generator().manual_seed(5)
    query_pos = torch.randint(10, 70, (40,), generator=g)
    query_pos[:3] = 69                                                  # the running max jumps at once
    case = (queries, keys, key_pos, key_valid, query_pos, query_valid)
    got = attention_mass(*case, 0.3, backend="triton", config=config)
    torch.testing.assert_close(got.double(), float64_mass(*case, 0.3), rtol=1e-4, atol=1e-5)


def test_mass_config_fills_defaults_and_rejects_bad_tiles():
    """``None`` entries take :data:`MASS_CONFIG` (4 warps below head_dim 128); a tuple works like the named
    config; tiles the kernel cannot take raise, also through :func:`attention_mass` (the torch path included)."""
    assert mass_config(128) == MASS_CONFIG
    assert mass_config(64) == MASS_CONFIG._replace(num_warps=4)
    assert mass_config(128, (32, None, None, 2)) == MassConfig(32, MASS_CONFIG.block_keys, MASS_CONFIG.num_warps, 2)
    assert mass_config(64, MassConfig(block_keys=256)) == MassConfig(MASS_CONFIG.block_rows, 256, 4,
                                                                     MASS_CONFIG.num_stages)
    for bad in ((24, None, None, None), (8, None, None, None), (None, 48, None, None), (None, None, 3, None),
                (None, None, None, 0)):
        with pytest.raises(ValueError, match="bad mass config"):
            mass_config(128, bad)
    with pytest.raises(ValueError, match="bad mass config"):
        attention_mass(*make_case(q=5, L=20), 0.3, config=(24, 16, 4, 1))


@needs_triton
def test_no_query_validity_and_rows_that_see_nothing():
    """``query_valid=None``; queries before every valid key (a row that sees no key gets no mass, not NaN)."""
    queries, keys, key_pos, key_valid, _, _ = make_case(B=2, H=4, Hkv=2, q=10, L=40)
    key_valid[:, :, :20] = False
    query_pos = torch.arange(10, 20)                                  # every query precedes every valid key
    got = attention_mass(queries, keys, key_pos, key_valid, query_pos, None, 0.5, backend="triton")
    assert torch.equal(got, torch.zeros_like(got))
    query_pos = torch.arange(15, 25)
    got = attention_mass(queries, keys, key_pos, key_valid, query_pos, None, 0.5, backend="triton")
    torch.testing.assert_close(got.double(), float64_mass(queries, keys, key_pos, key_valid, query_pos, None, 0.5),
                               rtol=1e-4, atol=1e-5)


@needs_triton
def test_strided_inputs_and_unsorted_positions():
    """Non-contiguous queries/keys (the engine's ``[1, H, n, D]`` transposes) and per-head key positions that are
    not in slot order (an HF cache after per-head eviction)."""
    queries, keys, key_pos, key_valid, query_pos, query_valid = make_case(B=2, H=8, Hkv=2, q=20, L=64)
    queries = queries.transpose(1, 2).contiguous().transpose(1, 2)
    keys = keys.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    key_pos = key_pos[..., perm].contiguous()
    case = (queries, keys, key_pos, key_valid, query_pos, query_valid)
    got = attention_mass(*case, 0.3, backend="triton")
    torch.testing.assert_close(got.double(), float64_mass(*case, 0.3), rtol=1e-4, atol=1e-5)


@needs_triton
def test_slot_table_reads_the_pool_in_place():
    """Keys through a ``[B, L]`` slot table into a ``[S, Hkv, D]`` pool viewed with stride 0 over rows (how the
    engine calls it) equal the gathered keys; invalid keys point at a garbage slot that must not matter."""
    queries, keys, key_pos, key_valid, query_pos, query_valid = make_case(B=2, H=8, Hkv=2, q=16, L=48)
    S = 200
    g = torch.Generator().manual_seed(2)
    slots = torch.randperm(S - 1, generator=g)[:96].view(2, 48)       # [B, L], rows own disjoint slots
    pool = torch.full((S, 2, 32), float("nan"))
    for b in range(2):
        pool[slots[b]] = keys[b].transpose(0, 1)
    slots = torch.where(key_valid[:, 0], slots, S - 1)                # invalid keys read the NaN slot (never)
    view = pool.permute(1, 0, 2).unsqueeze(0).expand(2, -1, -1, -1)   # [B, Hkv, S, D], stride 0 over B
    want = float64_mass(queries, keys, key_pos, key_valid, query_pos, query_valid, 0.3)
    for backend in ("triton", "torch"):
        got = attention_mass(queries, view, key_pos, key_valid, query_pos, query_valid, 0.3, backend=backend,
                             slots=slots)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """bf16/fp16 inputs (upcast under the interpreter, native on CUDA) against the reference on the same rounded
    inputs, accumulated in fp32."""
    case = make_case(H=8, Hkv=2, q=33, L=90, dtype=dtype)
    got = attention_mass(*case, 0.25, backend="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, attention_mass_ref(*case, 0.25), rtol=2e-2, atol=2e-3)


@needs_triton
@pytest.mark.parametrize("H,Hkv,split_size", [(8, 2, None), (7, 1, 40), (4, 4, 128), (6, 2, 33)])
def test_decode_mass_from_logits_equals_the_reference_and_one_query_attention_mass(H, Hkv, split_size):
    """The decode step's mass from the ``[B, H, L]`` logits (rows of different lengths, ``-inf`` past them, one row
    with no key at all): the torch reference, and :func:`attention_mass` of that one query (float64)."""
    B, L, D = 3, 300, 16
    g = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    lengths = torch.tensor([300, 121, 0])
    live = torch.arange(L).view(1, L) < lengths.view(B, 1)
    G = H // Hkv
    logits = torch.einsum("bhd,bhld->bhl", queries[:, :, 0], keys.repeat_interleave(G, 1)) * 0.4
    logits = logits.masked_fill(~live.view(B, 1, L), float("-inf"))
    got = decode_attention_mass(logits, Hkv, "triton", split_size=split_size)
    torch.testing.assert_close(got, decode_attention_mass_ref(logits, Hkv), rtol=1e-5, atol=1e-6)
    key_pos = torch.arange(L).expand(B, Hkv, L)
    exact = float64_mass(queries, keys, key_pos, live.view(B, 1, L).expand(B, Hkv, L), torch.tensor([L]), None,
                         0.4)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_bad_inputs_say_what_is_wrong():
    queries, keys, key_pos, key_valid, query_pos, query_valid = make_case(B=2, H=8, Hkv=2, q=4, L=16)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        attention_mass(queries[:, :7], keys, key_pos, key_valid, query_pos, query_valid, 0.3)
    with pytest.raises(ValueError, match="key_valid must be"):
        attention_mass(queries, keys, key_pos, key_valid[:, :1], query_pos, query_valid, 0.3)
    with pytest.raises(ValueError, match="query_pos must be"):
        attention_mass(queries, keys, key_pos, key_valid, query_pos[:2], query_valid, 0.3)
    with pytest.raises(ValueError, match="slots must be"):
        attention_mass(queries, keys, key_pos, key_valid, query_pos, query_valid, 0.3, slots=torch.zeros(16))
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        decode_attention_mass(torch.zeros(1, 6, 5), 4)


def test_auto_backend_on_cpu_is_the_reference():
    case = make_case(q=5, L=20)
    assert torch.equal(attention_mass(*case, 0.3), attention_mass_ref(*case, 0.3))
    case64 = tuple(t.double() if t.is_floating_point() else t for t in case)
    assert attention_mass(*case64, 0.3).dtype == torch.float64


@pytest.mark.parametrize("dtype, backend, passed", [
    (torch.float32, "auto", "torch"),          # fp32: the reference (run O, H200: 3.8x the kernel's prompt tok/s)
    (torch.bfloat16, "auto", "auto"),          # fp16/bf16: use_triton's own rule (the kernel on CUDA)
    (torch.float16, "auto", "auto"),
    (torch.float32, "triton", "triton"),       # an explicit backend is kept
    (torch.bfloat16, "torch", "torch"),
])
def test_auto_mass_backend_takes_the_reference_for_fp32(dtype, backend, passed, monkeypatch):
    """The dispatch decision (not its speed): what ``attention_mass`` asks ``use_triton`` for, by the keys' dtype;
    the result is the reference's either way."""
    import importlib

    module = importlib.import_module("sparse_hf.kernels.attention_mass")        # the package re-exports the function
    asked = []
    monkeypatch.setattr(module, "use_triton", lambda b, *_: asked.append(b) or False)
    case = make_case(q=5, L=20, dtype=dtype)
    torch.testing.assert_close(attention_mass(*case, 0.3, backend=backend), attention_mass_ref(*case, 0.3))
    assert asked == [passed]


@pytest.mark.gpu
def test_kernel_equals_reference_on_cuda_at_a_realistic_size():
    """4K keys, a 1K-query chunk after 3K earlier slots, Qwen2.5-7B's 28/4 heads and 128 dims, bf16 (at the default
    and a few other pass-2 tiles) and fp32; the decode mass from 128K logits."""
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        case = make_case(B=1, H=28, Hkv=4, q=1024, L=4096, D=128, dtype=dtype, device="cuda")
        ref = attention_mass_ref(*case, 128 ** -0.5)
        got = attention_mass(*case, 128 ** -0.5, backend="triton")
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * 0.1)
        torch.testing.assert_close(got.sum(), ref.sum(), rtol=1e-3, atol=0)
        if dtype == torch.bfloat16:                                     # pass 2's compiled tiles of the sweep
            for config in ((128, 128, 8, 3), (64, 256, 8, 2), (128, 64, 4, 3), (64, 64, 4, 4)):
                got = attention_mass(*case, 128 ** -0.5, backend="triton", config=config)
                torch.testing.assert_close(got, ref, rtol=tol, atol=tol * 0.1)
    logits = torch.randn(2, 28, 131072, device="cuda") * 3
    logits[1, :, 70000:] = float("-inf")                               # a shorter row
    torch.testing.assert_close(decode_attention_mass(logits, 4, "triton"), decode_attention_mass_ref(logits, 4),
                               rtol=1e-4, atol=1e-6)
