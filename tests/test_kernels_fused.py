"""The engine's fused decoder-layer kernels (rms_norm, rope_qkv, silu_mul) against their torch references, and the
references against transformers' own modules.

On CPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); shapes are small
versions of the engine's: ``[T, hidden]`` rows, a fused ``[T, (H + 2 Hkv) D]`` QKV, a ``[S, Hkv, D]`` slot pool.
"""

import pytest
import torch

from sparse_hf.kernels import (HAS_TRITON, rms_norm, rms_norm_ref, rope_qkv, rope_qkv_ref, silu_mul, silu_mul_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
T, H, HKV, D, P = 5, 4, 2, 16, 64
# bf16 results are compared with tolerances only: the kernels round where torch rounds, but the compiled kernels
# are not bit-identical on CUDA (an H200 run found rope_qkv off by one bf16 ulp in a few elements: the compiler
# may keep some fp32 intermediates), and the interpreter's fp32 -> bf16 casts do not round to nearest even.


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def _tables():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(P, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(DEV), emb.sin().to(DEV)


# ----------------------------------------------------------------------------------------- references vs HF
def test_references_match_transformers_modules():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    x = _rand(T, 24, seed=1)
    norm = LlamaRMSNorm(24, eps=1e-6).to(DEV)
    norm.weight.data = _rand(24, seed=2)
    assert torch.equal(rms_norm_ref(x, norm.weight, 1e-6), norm(x))
    res = _rand(T, 24, seed=3)
    expected = norm(res + x)
    assert torch.equal(rms_norm_ref(x, norm.weight, 1e-6, residual=res), expected)

    qkv = _rand(T, (H + 2 * HKV) * D, seed=4)
    pos = torch.tensor([0, 3, 7, 63, 12], device=DEV)
    cos, sin = _tables()
    q_hf = qkv[:, : H * D].view(1, T, H, D).transpose(1, 2)
    k_hf = qkv[:, H * D: (H + HKV) * D].view(1, T, HKV, D).transpose(1, 2)
    q_exp, k_exp = apply_rotary_pos_emb(q_hf, k_hf, cos[pos][None], sin[pos][None])
    q, k, v = rope_qkv_ref(qkv.clone(), pos, cos, sin, H, HKV)
    assert torch.equal(q, q_exp[0].transpose(0, 1)) and torch.equal(k, k_exp[0].transpose(0, 1))
    assert torch.equal(v, qkv[:, (H + HKV) * D:].view(T, HKV, D))

    gu = _rand(T, 2 * 12, seed=5)
    assert torch.equal(silu_mul_ref(gu), torch.nn.functional.silu(gu[:, :12]) * gu[:, 12:])


# ----------------------------------------------------------------------------------------- kernels vs references
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [96, 64])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel(dtype, n, with_residual):
    x, w = _rand(T, n, dtype=dtype, seed=1), _rand(n, dtype=dtype, seed=2)
    res = _rand(T, n, dtype=dtype, seed=3) if with_residual else None
    res_ref = res.clone() if with_residual else None
    out = rms_norm(x, w, 1e-6, residual=res, backend="triton")
    ref = rms_norm_ref(x, w, 1e-6, residual=res_ref)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if with_residual:
        torch.testing.assert_close(res, res_ref, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("store", [False, True])
def test_rope_qkv_kernel(dtype, qk_norm, store):
    qkv = _rand(T, (H + 2 * HKV) * D, dtype=dtype, seed=4)
    pos = torch.tensor([0, 3, 7, 63, 12], device=DEV)
    cos, sin = _tables()
    norms = (_rand(D, dtype=dtype, seed=5), _rand(D, dtype=dtype, seed=6)) if qk_norm else (None, None)
    S = 12
    pools = [torch.zeros(S, HKV, D, dtype=dtype, device=DEV) for _ in range(4)]
    slots = torch.tensor([3, -1, 0, 11, 5], device=DEV)
    dest = dict(k_pool=pools[0], v_pool=pools[1], slot_mapping=slots) if store else {}
    dest_ref = dict(k_pool=pools[2], v_pool=pools[3], slot_mapping=slots) if store else {}
    a, b = qkv.clone(), qkv.clone()
    q, k, v = rope_qkv(a, pos, cos, sin, H, HKV, *norms, 1e-6, **dest, backend="triton")
    qr, kr, vr = rope_qkv_ref(b, pos, cos, sin, H, HKV, *norms, 1e-6, **dest_ref)
    assert q.shape == (T, H, D) and k.shape == (T, HKV, D) and v.shape == (T, HKV, D)
    torch.testing.assert_close(a, b, **TOL[dtype])            # q, k rotated in place, v untouched
    if store:
        torch.testing.assert_close(pools[0], pools[2], **TOL[dtype])
        torch.testing.assert_close(pools[1], pools[3], **TOL[dtype])
        assert not pools[0][[1, 2, 4, 6, 7, 8, 9, 10]].any()  # only the mapped slots (-1 skipped) are written
        torch.testing.assert_close(pools[0][slots[0]], k[0])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [40, 1500])
def test_silu_mul_kernel(dtype, inter):
    gu = _rand(3, 2 * inter, dtype=dtype, seed=7)
    out = silu_mul(gu, backend="triton")
    ref = silu_mul_ref(gu)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_auto_backend_on_cpu_is_the_reference():
    x, w = _rand(T, 32), _rand(32, seed=1)
    assert torch.equal(rms_norm(x.cpu(), w.cpu(), 1e-6), rms_norm_ref(x.cpu(), w.cpu(), 1e-6))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(_rand(T, 32), _rand(16), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(_rand(T, 32), _rand(32), 1e-6, residual=_rand(T, 16))
    cos, sin = _tables()
    with pytest.raises(ValueError, match=r"\(H \+ 2 \* Hkv\) \* D"):
        rope_qkv(_rand(T, 10), torch.zeros(T, dtype=torch.long, device=DEV), cos, sin, H, HKV)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_qkv(_rand(T, (H + 2 * HKV) * D), torch.zeros(T, dtype=torch.long, device=DEV), cos, sin, H, HKV,
                 k_pool=torch.zeros(4, HKV, D, device=DEV))
    with pytest.raises(ValueError, match="even"):
        silu_mul(_rand(T, 7))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 40, 24), (5, 64, 50), (16, 300, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_kernel(dtype, m, k, n, bias):
    from sparse_hf.kernels.skinny_gemm import skinny_linear

    x, w = _rand(m, k, dtype=dtype, seed=8), _rand(n, k, dtype=dtype, seed=9)
    b = _rand(n, dtype=dtype, seed=10) if bias else None
    out = skinny_linear(x, w, b, backend="triton", block_n=16, block_k=32)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **({torch.float32: dict(atol=1e-4, rtol=1e-4)}.get(dtype, TOL[dtype])))


def test_skinny_linear_falls_back_beyond_16_rows_and_on_bad_shapes():
    from sparse_hf.kernels.skinny_gemm import skinny_linear

    x, w = _rand(17, 8), _rand(4, 8, seed=1)
    assert torch.equal(skinny_linear(x, w), torch.nn.functional.linear(x, w))
    with pytest.raises(ValueError, match="weight"):
        skinny_linear(x, _rand(4, 9))


def test_decode_kernels_aim_for_four_programs_per_sm(monkeypatch):
    """The decode split heuristic (tuned on an H200): one 128K row with 4 KV heads on 132 SMs -> 1024-token splits."""
    import sparse_hf.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "num_sms", lambda device: 132)
    dev = torch.device("cpu")
    assert dispatch.plan_splits(131072, 4, dev, programs_per_sm=dispatch.DECODE_PROGRAMS_PER_SM)[:2] == (1024, 128)
    assert dispatch.plan_splits(131072, 4, dev)[:2] == (2048, 64)              # the default stays two per SM
