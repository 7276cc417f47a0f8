"""Decode kernels (sparse_hf.kernels) against naive float64 references.

On CPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so sizes are
tiny and ``split_size`` is forced small to exercise the split-K log-sum-exp merge. ``@pytest.mark.gpu`` tests
use bf16 and realistic sizes on CUDA.
"""

import os
import sys

import pytest
import torch

from sparse_hf.kernels import (HAS_TRITON, decode_attention_with_scores, decode_attention_with_scores_ref,
                               snapkv_prefill_scores, snapkv_prefill_scores_ref, sparse_decode_attention,
                               sparse_decode_attention_ref)
from sparse_hf.kernels.dispatch import plan_splits, use_triton
from sparse_hf.kernels.sparse_decode import _sparse_decode_kernel

CUDA = torch.cuda.is_available()
# Every tensor of every test lives on DEV, whatever the backend. With CUDA, conftest leaves TRITON_INTERPRET unset,
# so the Triton kernels are compiled and accept CUDA tensors only; without CUDA they are built by the interpreter
# and run CPU tensors. The torch backend runs on the same device so that both see the same inputs.
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
B, D, L, K = 2, 16, 48, 24
HEADS = [(4, 2), (4, 4), (4, 1)]          # (H, Hkv): GQA, MHA, MQA


# ----------------------------------------------------------------------------------- naive float64 references
def naive_sparse(q, k, v, idx, nidx=None, scale=None):
    Bq, H, Dq = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = Dq ** -0.5 if scale is None else scale
    out = torch.zeros(Bq, H, Dq, dtype=torch.float64)
    for b in range(Bq):
        for h in range(H):
            kh = h // (H // Hkv)
            n = idx.shape[-1] if nidx is None else min(int(nidx[b]), idx.shape[-1])
            sel = [int(i) for i in idx[b, kh, :n].tolist() if 0 <= i < Lk]
            if sel:
                s = k[b, kh, sel].double().cpu() @ q[b, h].double().cpu() * scale
                out[b, h] = torch.softmax(s, 0) @ v[b, kh, sel].double().cpu()
    return out


def naive_scores(q, k, v, lengths=None, valid=None, scale=None):
    """Returns (out [B, H, D], per-head logits [B, H, L] with -inf where masked), float64."""
    Bq, H, Dq = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = Dq ** -0.5 if scale is None else scale
    out = torch.zeros(Bq, H, Dq, dtype=torch.float64)
    sc = torch.full((Bq, H, Lk), float("-inf"), dtype=torch.float64)
    for b in range(Bq):
        n = Lk if lengths is None else min(int(lengths[b]), Lk)
        sel = [j for j in range(n) if valid is None or bool(valid[b, j])]
        for h in range(H):
            kh = h // (H // Hkv)
            if sel:
                s = k[b, kh, sel].double().cpu() @ q[b, h].double().cpu() * scale
                sc[b, h, sel] = s
                out[b, h] = torch.softmax(s, 0) @ v[b, kh, sel].double().cpu()
    return out, sc


def naive_snapkv_per_head(qw, k, cand, scale, qvalid=None):
    """[B, H, L] float64: per query head, softmax over the candidates, mean over the valid window queries."""
    Bq, H, W, Dq = qw.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    res = torch.zeros(Bq, H, Lk, dtype=torch.float64)
    for b in range(Bq):
        ws = [w for w in range(W) if qvalid is None or bool(qvalid[b, w])]
        for h in range(H):
            kh = h // G
            c = cand[b] if cand.dim() == 2 else cand[b, kh]
            sel = [j for j in range(Lk) if bool(c[j])]
            if sel and ws:
                p = torch.softmax(qw[b, h, ws].double().cpu() @ k[b, kh, sel].double().cpu().T * scale, -1)
                res[b, h, sel] = p.mean(0)
    return res


def naive_snapkv(qw, k, cand, scale, qvalid=None):
    """[B, Hkv, L]: the per-head scores, max over each KV group's query heads."""
    per_head = naive_snapkv_per_head(qw, k, cand, scale, qvalid)
    return per_head.view(qw.shape[0], k.shape[1], -1, k.shape[2]).amax(2)


def make_kv(Hkv, layout, dtype=torch.float32, n=L, b=B, d=D, device=DEV):
    """k, v of shape [b, Hkv, n, d] in a given memory layout."""
    g = torch.Generator().manual_seed(1)

    def one():
        if layout == "contig":
            return torch.randn(b, Hkv, n, d, generator=g).to(device, dtype)
        if layout == "view":          # preallocated buffer, only the first n slots filled; padded head dim
            return torch.randn(b, Hkv, n + 17, d + 8, generator=g).to(device, dtype)[:, :, :n, :d]
        if layout == "transposed":    # [B, L, Hkv, D] storage
            return torch.randn(b, n, Hkv, d, generator=g).to(device, dtype).transpose(1, 2)
        if layout == "expand":        # one shared slot pool, stride 0 over the batch
            return torch.randn(1, Hkv, n, d, generator=g).to(device, dtype).expand(b, Hkv, n, d)
        raise ValueError(layout)
    return one(), one()


def rand_q(H, dtype=torch.float32, b=B, d=D, seed=2):
    return torch.randn(b, H, d, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def rand_idx(Hkv, n=K, length=L, b=B, dtype=torch.int64, pad=True, seed=3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.stack([torch.randperm(length, generator=g)[:n] for _ in range(Hkv)]) for _ in range(b)])
    if pad:                                     # some padding entries, including in the middle of a row
        idx[0, 0, 5] = -1
        idx[-1, -1, n - 3:] = -1
    return idx.to(DEV, dtype)


def close(out, ref, atol=2e-5, rtol=2e-5):
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=atol, rtol=rtol)


def close_scores(sc, ref, atol=2e-5, rtol=2e-5):
    sc, ref = sc.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isinf(sc), torch.isinf(ref)), "masked positions differ"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(sc[fin], ref[fin], atol=atol, rtol=rtol)


def reduce(sc, Hkv, mode):
    b, H, n = sc.shape
    return {"per_head": sc, "group_max": sc.view(b, Hkv, H // Hkv, n).amax(2), "all_max": sc.amax(1)}[mode]


BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


# ------------------------------------------------------------------------------------------ sparse decode
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("split_size", [None, 16, 5])
def test_sparse_decode_matches_reference(backend, H, Hkv, split_size):
    q, (k, v) = rand_q(H), make_kv(Hkv, "contig")
    idx = rand_idx(Hkv)
    out = sparse_decode_attention(q, k, v, idx, backend=backend, split_size=split_size)
    assert out.shape == (B, H, D) and out.dtype == q.dtype
    close(out, naive_sparse(q, k, v, idx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["view", "transposed", "expand"])
def test_sparse_decode_strided_kv_and_num_indices(backend, layout):
    H, Hkv = 4, 2
    q, (k, v) = rand_q(H), make_kv(Hkv, layout)
    idx = rand_idx(Hkv, dtype=torch.int32)
    nidx = torch.tensor([K, 9], device=DEV)
    out = sparse_decode_attention(q, k, v, idx, nidx, scale=0.3, backend=backend, split_size=8)
    close(out, naive_sparse(q, k, v, idx, nidx, scale=0.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_empty_rows_are_zero(backend):
    H, Hkv = 4, 2
    q, (k, v) = rand_q(H), make_kv(Hkv, "contig")
    idx = rand_idx(Hkv)
    idx[1] = -1                                          # row 1: only padding
    nidx = torch.tensor([0, K], device=DEV)              # row 0: nothing used
    out = sparse_decode_attention(q, k, v, idx, nidx, backend=backend, split_size=16)
    assert torch.isfinite(out).all() and (out == 0).all()
    idx = torch.empty(B, Hkv, 0, dtype=torch.long, device=DEV)
    assert (sparse_decode_attention(q, k, v, idx, backend=backend) == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_half_precision(dtype):
    H, Hkv = 4, 2
    q, (k, v) = rand_q(H, dtype), make_kv(Hkv, "contig", dtype)
    idx = rand_idx(Hkv)
    out = sparse_decode_attention(q, k, v, idx, backend="triton", split_size=8)
    assert out.dtype == dtype
    close(out, naive_sparse(q, k, v, idx), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------- decode with scores
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("mode", ["per_head", "group_max", "all_max"])
def test_decode_scores_modes(backend, H, Hkv, mode):
    q, (k, v) = rand_q(H), make_kv(Hkv, "contig")
    lengths = torch.tensor([L, 29], device=DEV)
    out, sc = decode_attention_with_scores(q, k, v, lengths, score_mode=mode, backend=backend, split_size=16)
    ref_out, ref_sc = naive_scores(q, k, v, lengths)
    assert sc.dtype == torch.float32
    assert sc.shape == {"per_head": (B, H, L), "group_max": (B, Hkv, L), "all_max": (B, L)}[mode]
    close(out, ref_out)
    close_scores(sc, reduce(ref_sc, Hkv, mode))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["view", "transposed", "expand"])
@pytest.mark.parametrize("split_size", [None, 12])
def test_decode_scores_strided_valid_lengths(backend, layout, split_size):
    H, Hkv = 4, 2
    q, (k, v) = rand_q(H), make_kv(Hkv, layout)
    lengths = torch.tensor([33, L], device=DEV)
    valid = torch.rand(B, L, generator=torch.Generator().manual_seed(5)) > 0.3
    valid[1, :20] = False                                # whole leading blocks masked
    valid = valid.to(DEV)
    out, sc = decode_attention_with_scores(q, k, v, lengths, valid, scale=0.2, backend=backend,
                                           split_size=split_size)
    ref_out, ref_sc = naive_scores(q, k, v, lengths, valid, scale=0.2)
    close(out, ref_out)
    close_scores(sc, ref_sc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_scores_empty_row(backend):
    H, Hkv = 4, 2
    q, (k, v) = rand_q(H), make_kv(Hkv, "contig")
    out, sc = decode_attention_with_scores(q, k, v, torch.tensor([0, 7], device=DEV), score_mode="group_max",
                                           backend=backend, split_size=16)
    ref_out, ref_sc = naive_scores(q, k, v, [0, 7])
    assert (out[0] == 0).all() and torch.isinf(sc[0]).all()
    close(out, ref_out)
    close_scores(sc, reduce(ref_sc, Hkv, "group_max"))


@needs_triton
def test_decode_scores_bf16():
    H, Hkv = 4, 2
    q, (k, v) = rand_q(H, torch.bfloat16), make_kv(Hkv, "contig", torch.bfloat16)
    out, sc = decode_attention_with_scores(q, k, v, backend="triton", split_size=16)
    ref_out, ref_sc = naive_scores(q, k, v)
    close(out, ref_out, atol=2e-2, rtol=2e-2)
    close_scores(sc, ref_sc, atol=1e-4, rtol=1e-4)       # bf16 products are exact in the fp32 accumulator


# ----------------------------------------------------------------------------------------------- snapkv
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv,W", [(4, 2, 6), (2, 2, 3)])
@pytest.mark.parametrize("per_head_cand", [False, True])
def test_snapkv_prefill_scores(backend, H, Hkv, W, per_head_cand):
    g = torch.Generator().manual_seed(7)
    qw = torch.randn(B, H, W, D, generator=g).to(DEV)
    k, _ = make_kv(Hkv, "transposed")
    cand = torch.rand((B, Hkv, L) if per_head_cand else (B, L), generator=g) > 0.4
    qvalid = torch.rand(B, W, generator=g) > 0.3
    qvalid[:, -1] = True
    cand, qvalid = cand.to(DEV), qvalid.to(DEV)
    for qv in (None, qvalid):
        out = snapkv_prefill_scores(qw, k, cand, 0.25, qv, backend=backend, split_size=16)
        close(out, naive_snapkv(qw, k, cand, 0.25, qv), atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------- dispatch / misc
def test_backend_selection():
    q, (k, v) = rand_q(4), make_kv(2, "contig")
    assert use_triton("torch", _sparse_decode_kernel, q, k, v) is False
    assert use_triton("auto", _sparse_decode_kernel, q.double(), k.double(), v.double()) is False
    # "auto" runs Triton on CUDA only; CPU tensors take torch even under the interpreter (a test tool).
    assert use_triton("auto", _sparse_decode_kernel, q, k, v) is (HAS_TRITON and CUDA)
    assert use_triton("auto", _sparse_decode_kernel, q.cpu(), k.cpu(), v.cpu()) is False
    if HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        assert use_triton("triton", _sparse_decode_kernel, q, k, v) is True
    with pytest.raises(ValueError):
        sparse_decode_attention(q, k, v, rand_idx(2), backend="cuda")
    # float64 falls back to torch under "auto" and is exact
    idx = rand_idx(2)
    close(sparse_decode_attention(q.double(), k.double(), v.double(), idx), naive_sparse(q, k, v, idx),
          atol=1e-12, rtol=1e-12)


def test_plan_splits():
    assert plan_splits(24, 4, torch.device("cpu"), 5) == (5, 5, 16)
    assert plan_splits(24, 4, torch.device("cpu")) == (64, 1, 64)
    size, n, blk = plan_splits(4096, 8, torch.device("cpu"), 100)
    assert (size, n, blk) == (100, 41, 64)


def test_imports_without_triton(monkeypatch):
    """With triton unimportable, sparse_hf.kernels still imports and every call runs the torch path."""
    import importlib

    import sparse_hf
    for name in [n for n in sys.modules if n == "sparse_hf.kernels" or n.startswith("sparse_hf.kernels.")]:
        monkeypatch.delitem(sys.modules, name)              # restored (with the real modules) on teardown
    monkeypatch.setattr(sparse_hf, "kernels", sys.modules.get("sparse_hf.kernels"), raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    kk = importlib.import_module("sparse_hf.kernels")
    assert not kk.HAS_TRITON
    q, (k, v) = rand_q(4), make_kv(2, "contig")
    idx = rand_idx(2)
    close(kk.sparse_decode_attention(q, k, v, idx), naive_sparse(q, k, v, idx))
    out, sc = kk.decode_attention_with_scores(q, k, v, score_mode="all_max")
    assert sc.shape == (B, L)
    with pytest.raises(RuntimeError):
        kk.sparse_decode_attention(q, k, v, idx, backend="triton")


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv", [(32, 8), (32, 32)])
@pytest.mark.parametrize("Bg,Lg,Kg", [(2, 4096, 512), (1, 32768, 2048)])
def test_gpu_sparse_decode_bf16(H, Hkv, Bg, Lg, Kg):
    q = rand_q(H, torch.bfloat16, b=Bg, d=128)
    k, v = make_kv(Hkv, "view", torch.bfloat16, n=Lg, b=Bg, d=128)
    idx = rand_idx(Hkv, n=Kg, length=Lg, b=Bg)
    nidx = torch.tensor([Kg, Kg // 3][:Bg], device=DEV)
    out = sparse_decode_attention(q, k, v, idx, nidx, backend="triton")
    ref = sparse_decode_attention_ref(q.double(), k.double(), v.double(), idx, nidx)
    close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_head", "group_max", "all_max"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_decode_scores(mode, dtype):
    Bg, H, Hkv, Lg = 2, 32, 8, 4096
    q = rand_q(H, dtype, b=Bg, d=128)
    k, v = make_kv(Hkv, "expand", dtype, n=Lg, b=Bg, d=128)
    lengths = torch.tensor([Lg, 3001], device=DEV)
    valid = (torch.rand(Bg, Lg, device=DEV) > 0.1)
    out, sc = decode_attention_with_scores(q, k, v, lengths, valid, score_mode=mode, backend="triton")
    ref_out, ref_sc = decode_attention_with_scores_ref(q.double(), k.double(), v.double(), lengths, valid,
                                                       score_mode=mode)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    close(out, ref_out, atol=tol, rtol=tol)
    close_scores(sc, ref_sc, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_snapkv_bf16():
    Bg, H, Hkv, W, Lg = 2, 32, 8, 32, 4096
    qw = torch.randn(Bg, H, W, 128, device=DEV, dtype=torch.bfloat16)
    k, _ = make_kv(Hkv, "contig", torch.bfloat16, n=Lg, b=Bg, d=128)
    cand = torch.rand(Bg, Lg, device=DEV) > 0.05
    out = snapkv_prefill_scores(qw, k, cand, 128 ** -0.5, backend="triton")
    ref = snapkv_prefill_scores_ref(qw.double(), k.double(), cand, 128 ** -0.5)
    close(out, ref, atol=1e-4, rtol=2e-2)


# -- dense mode and the fused append (decode-mode helpers) --------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_mode_matches_index_list(backend):
    from sparse_hf.kernels import sparse_decode_attention, sparse_decode_attention_ref

    torch.manual_seed(3)
    B, H, Hkv, L, D = 2, 4, 2, 40, 16
    q, k, v = (torch.randn(B, H, D, device=DEV), torch.randn(B, Hkv, L, D, device=DEV),
               torch.randn(B, Hkv, L, D, device=DEV))
    pos = torch.randint(0, 100, (B, Hkv, L), device=DEV)
    pos[torch.rand(B, Hkv, L, device=DEV) < 0.4] = -1            # empty slots
    slots = torch.arange(L, device=DEV).expand(B, Hkv, L)
    ref = sparse_decode_attention_ref(q.double(), k.double(), v.double(), torch.where(pos >= 0, slots, -1))
    out = sparse_decode_attention(q, k, v, pos, backend=backend, dense=True, split_size=16)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_kv(backend):
    from sparse_hf.kernels import append_kv

    B, Hkv, cap, D = 2, 3, 10, 16
    k_buf, v_buf = torch.zeros(B, Hkv, cap, D, device=DEV), torch.zeros(B, Hkv, cap, D, device=DEV)
    pos = torch.full((B, Hkv, cap), -1, dtype=torch.long, device=DEV)
    counters = torch.tensor([4, 17], device=DEV)
    key, value = torch.randn(B, Hkv, 1, D, device=DEV), torch.randn(B, Hkv, 1, D, device=DEV)
    append_kv(k_buf, v_buf, pos, counters, key, value, backend=backend)
    assert torch.equal(k_buf[:, :, 4], key[:, :, 0]) and torch.equal(v_buf[:, :, 4], value[:, :, 0])
    assert (pos[:, :, 4] == 17).all() and (pos[:, :, :4] == -1).all() and (pos[:, :, 5:] == -1).all()
    assert counters.tolist() == [5, 18]
    assert k_buf[:, :, :4].abs().sum() == 0 and k_buf[:, :, 5:].abs().sum() == 0


# -- per-token slot mapping (the engine's append) -----------------------------------------------------------------
def naive_store(k_pool, v_pool, pos_pool, key, value, slots, positions):
    """Token-by-token loop: the independent oracle of store_kv_slots."""
    k_pool, v_pool, pos_pool = k_pool.clone().cpu(), v_pool.clone().cpu(), pos_pool.clone().cpu()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_pool[slot], v_pool[slot] = key[t].cpu(), value[t].cpu()
            pos_pool[slot] = int(positions[t])
    return k_pool, v_pool, pos_pool


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos_heads", [False, True])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_slots(backend, pos_heads, slot_dtype):
    from sparse_hf.kernels import store_kv_slots, store_kv_slots_ref

    g = torch.Generator().manual_seed(11)
    S, T, Hkv, D, Dv = 20, 7, 3, 16, 8                       # Dv != D: the value width is independent
    pool = torch.randn(2, 2, S, Hkv, D, generator=g).to(DEV)   # [2, layers, slots, Hkv, D]: write layer 1's view
    k_pool, v_pool = pool[0, 1], torch.randn(S, Hkv, Dv, generator=g).to(DEV)
    pos_pool = torch.full((S, Hkv) if pos_heads else (S,), -1, dtype=torch.long, device=DEV)
    key = torch.randn(T, Hkv, D, generator=g).to(DEV)
    value = torch.randn(T, Hkv, Dv, generator=g).to(DEV)
    slots = torch.tensor([5, -1, 0, 19, 7, -1, 12], dtype=slot_dtype, device=DEV)   # -1: skipped tokens
    positions = torch.tensor([100, 101, 3, 40, 41, 42, 7], device=DEV)
    want = naive_store(k_pool, v_pool, pos_pool, key, value, slots, positions)
    ref = [t.clone() for t in (k_pool, v_pool, pos_pool)]
    store_kv_slots_ref(ref[0], ref[1], key, value, slots, ref[2], positions)
    store_kv_slots(k_pool, v_pool, key, value, slots, pos_pool, positions, backend=backend)
    for got, r, w in zip((k_pool, v_pool, pos_pool), ref, want):
        assert torch.equal(got.cpu(), w) and torch.equal(r.cpu(), w)
    assert torch.equal(pool[0, 0].cpu(), torch.randn(2, 2, S, Hkv, D, generator=torch.Generator().manual_seed(11))[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_kv_slots_without_positions_and_errors(backend):
    from sparse_hf.kernels import store_kv_slots

    k_pool, v_pool = torch.zeros(6, 2, 16, device=DEV), torch.zeros(6, 2, 16, device=DEV)
    key, value = torch.ones(3, 2, 16, device=DEV), 2 * torch.ones(3, 2, 16, device=DEV)
    store_kv_slots(k_pool, v_pool, key, value, torch.tensor([-1, 4, -1], device=DEV), backend=backend)
    assert (k_pool[4] == 1).all() and (v_pool[4] == 2).all() and k_pool.sum() == 32 and v_pool.sum() == 64
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv_slots(k_pool, v_pool, key, value, torch.tensor([0, 1], device=DEV), backend=backend)
    with pytest.raises(ValueError, match="together"):
        store_kv_slots(k_pool, v_pool, key, value, torch.tensor([0, 1, 2], device=DEV),
                       positions=torch.arange(3, device=DEV), backend=backend)


# -- SnapKV scores as production computes them (methods.snapkv.snapkv_scores) ------------------------------------
def naive_snapkv_method(qw, k, cand, qvalid, scale, pool):
    """SnapKV as the paper states it: per-head scores, max-pooled along L per head (before any head reduction),
    then the max over the group; non-candidates -inf."""
    per_head = naive_snapkv_per_head(qw, k, cand, scale, qvalid)
    pooled = per_head.clone()
    Lk = per_head.shape[-1]
    for j in range(Lk):
        lo, hi = max(0, j - pool // 2), min(Lk, j + pool // 2 + 1)
        pooled[..., j] = per_head[..., lo:hi].amax(-1)
    out = pooled.view(qw.shape[0], k.shape[1], -1, Lk).amax(2)
    return out.masked_fill(~cand.cpu(), float("-inf"))


@pytest.mark.parametrize("pool", [1, 3, 7])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1)])
def test_snapkv_scores_match_naive_oracle(pool, H, Hkv):
    """Production's snapkv_scores (kernel entry + pooling) against a per-head loop that pools before reducing."""
    from sparse_hf.methods.snapkv import snapkv_scores

    g = torch.Generator().manual_seed(13)
    W = 5
    qw = torch.randn(B, H, W, D, generator=g).to(DEV)
    k, _ = make_kv(Hkv, "transposed")
    cand = (torch.rand(B, Hkv, L, generator=g) > 0.3).to(DEV)
    cand[1, :, :10] = False                                 # a left-padded row
    qvalid = torch.ones(B, W, dtype=torch.bool)
    qvalid[1, :2] = False                                   # its first window queries are padding
    qvalid = qvalid.to(DEV)
    for qv in (None, qvalid):
        out = snapkv_scores(qw, k, cand, qv, 0.25, pool)
        close_scores(out, naive_snapkv_method(qw, k, cand, qv, 0.25, pool), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapkv_head_reduce_all(backend):
    g = torch.Generator().manual_seed(17)
    qw = torch.randn(B, 4, 3, D, generator=g).to(DEV)
    k, _ = make_kv(2, "contig")
    cand = (torch.rand(B, L, generator=g) > 0.3).to(DEV)
    out = snapkv_prefill_scores(qw, k, cand, 0.25, backend=backend, head_reduce="all", split_size=16)
    assert out.shape == (B, 1, L)
    close(out[:, 0], naive_snapkv(qw, k, cand, 0.25).amax(1), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="head_reduce"):
        snapkv_prefill_scores(qw, k, cand, 0.25, backend=backend, head_reduce="layer")


def test_snapkv_reference_is_chunked(monkeypatch):
    """The torch path never builds a [B, H, W, L] block: with a one-query budget every chunk is [B, H, 1, L],
    and the result equals the naive oracle whatever the chunk size."""
    import sparse_hf.kernels.reference as ref

    g = torch.Generator().manual_seed(19)
    W = 6
    qw = torch.randn(B, 4, W, D, generator=g)
    k = torch.randn(B, 2, L, D, generator=g)
    cand = torch.rand(B, L, generator=g) > 0.3
    qvalid = torch.rand(B, W, generator=g) > 0.4
    want = naive_snapkv(qw, k, cand, 0.25, qvalid)
    seen = []
    einsum = torch.einsum

    def spy(eq, *ops):
        out = einsum(eq, *ops)
        if eq.endswith("->bhgwl"):
            seen.append(out.shape[3])
        return out

    monkeypatch.setattr(ref.torch, "einsum", spy)
    monkeypatch.setattr(ref, "SNAPKV_CHUNK_ELEMENTS", B * 4 * L)       # room for one window query per block
    close(ref.snapkv_prefill_scores_ref(qw, k, cand, 0.25, qvalid), want, atol=1e-6, rtol=1e-5)
    assert seen == [1] * W
    for chunk in (2, 4, W):
        close(ref.snapkv_prefill_scores_ref(qw, k, cand, 0.25, qvalid, window_chunk=chunk), want,
              atol=1e-6, rtol=1e-5)
