"""Fused decoder-layer ops for the engine: RMSNorm (with the residual add), RoPE on q/k (with Qwen3's q/k norm and
the K/V store into the slot pool), and ``silu(gate) * up``.

Why: at decode, a layer's GEMMs read the weights at close to the memory bandwidth, but the elementwise work between
them ran as ~40 small torch kernels per layer (RMSNorm alone is 7: cast, pow, mean, add, rsqrt, mul, cast, mul);
each costs a few microseconds even inside a CUDA graph, which at 28 layers is a large part of a decode step. Here
each op is one launch, one program per token (a row of the packed ``[T, ...]`` activations).

Every kernel rounds where transformers rounds (``x.dtype`` after the residual add, after the normalisation and
after each RoPE product), so bf16 results match the torch versions in :mod:`sparse_hf.kernels.reference`
(:func:`~.reference.rms_norm_ref`, :func:`~.reference.rope_qkv_ref`, :func:`~.reference.silu_mul_ref`) to about one
bf16 ulp: not bit for bit (an H200 run found RoPE one ulp off in a few elements; the norm's fp32 sum order differs).
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, next_pow2, tl, triton, use_triton
from .reference import rms_norm_ref, rope_qkv_ref, silu_mul_ref

if HAS_TRITON:

    @triton.jit
    def _round(x, DT: tl.constexpr):
        """``x`` (fp32) rounded to ``DT`` and back: the rounding of a torch op computed in ``DT``."""
        return x.to(DT).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(X, R, W, OUT, N, eps, sx, sr, so,
                         HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        m = cols < N
        DT: tl.constexpr = X.dtype.element_ty
        x = tl.load(X + t * sx + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            x = _round(x + tl.load(R + t * sr + cols, mask=m, other=0.0).to(tl.float32), DT)
            tl.store(R + t * sr + cols, x.to(R.dtype.element_ty), mask=m)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        h = _round(x * inv, DT)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + t * so + cols, (h * w).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_heads(base, n_heads, c, s, NW, eps,
                    D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    QK_NORM: tl.constexpr):
        """Rotate ``n_heads`` heads of ``D`` at ``base`` (one token) in place; returns the rotated halves
        ``[BLOCK_H, BLOCK_HALF]`` (fp32 holding ``DT`` values) and their mask."""
        DT: tl.constexpr = base.dtype.element_ty
        h = tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_HALF)
        m = (h[:, None] < n_heads) & (j[None, :] < HALF)
        p1 = base + h[:, None] * D + j[None, :]
        x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
        if QK_NORM:
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
            w1 = tl.load(NW + j, mask=j < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(NW + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
            x1 = _round(_round(x1 * inv[:, None], DT) * w1[None, :], DT)
            x2 = _round(_round(x2 * inv[:, None], DT) * w2[None, :], DT)
        # transformers: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to DT
        o1 = _round(_round(x1 * c[None, :], DT) - _round(x2 * s[None, :], DT), DT)
        o2 = _round(_round(x2 * c[None, :], DT) + _round(x1 * s[None, :], DT), DT)
        tl.store(p1, o1.to(DT), mask=m)
        tl.store(p1 + HALF, o2.to(DT), mask=m)
        return o1, o2, m

    @triton.jit
    def _rope_qkv_kernel(QKV, POS, COS, SIN, QW, KW, KP, VP, SLOT,
                         s_t, s_cos, s_sin, skp_s, skp_h, svp_s, svp_h, eps,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                         QK_NORM: tl.constexpr, STORE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        DT: tl.constexpr = QKV.dtype.element_ty
        pos = tl.load(POS + t).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        jm = j < HALF
        c = _round(tl.load(COS + pos * s_cos + j, mask=jm, other=0.0).to(tl.float32), DT)
        s = _round(tl.load(SIN + pos * s_sin + j, mask=jm, other=0.0).to(tl.float32), DT)
        base = QKV + t * s_t
        _rope_heads(base, H, c, s, QW, eps, D, HALF, BLOCK_H, BLOCK_HALF, QK_NORM)
        k1, k2, km = _rope_heads(base + H * D, HKV, c, s, KW, eps, D, HALF, BLOCK_HKV, BLOCK_HALF, QK_NORM)
        if STORE:
            slot = tl.load(SLOT + t).to(tl.int64)
            h = tl.arange(0, BLOCK_HKV)
            sm = km & ((tl.zeros([BLOCK_HKV, BLOCK_HALF], tl.int64) + slot) >= 0)     # slot -1: not stored
            kp = KP + slot * skp_s + h[:, None] * skp_h + j[None, :]
            tl.store(kp, k1.to(KP.dtype.element_ty), mask=sm)
            tl.store(kp + HALF, k2.to(KP.dtype.element_ty), mask=sm)
            vsrc = base + (H + HKV) * D + h[:, None] * D + j[None, :]
            vp = VP + slot * svp_s + h[:, None] * svp_h + j[None, :]
            tl.store(vp, tl.load(vsrc, mask=sm, other=0.0).to(VP.dtype.element_ty), mask=sm)
            tl.store(vp + HALF, tl.load(vsrc + HALF, mask=sm, other=0.0).to(VP.dtype.element_ty), mask=sm)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, I, s_gu, s_o, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        DT: tl.constexpr = GU.dtype.element_ty
        g = tl.load(GU + t * s_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + t * s_gu + I + cols, mask=m, other=0.0).to(tl.float32)
        act = _round(g / (1.0 + tl.exp(-g)), DT)
        tl.store(OUT + t * s_o + cols, (act * u).to(OUT.dtype.element_ty), mask=m)
else:  # pragma: no cover - exercised only without triton
    _rms_norm_kernel = None
    _rope_qkv_kernel = None
    _silu_mul_kernel = None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[T, N]`` with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim, optionally after ``residual += x`` (in place); one launch on the GPU.

    Args:
        x: ``[..., N]``; weight: ``[N]``; eps: the norm's epsilon.
        residual: optional, same shape and dtype as ``x``, contiguous: updated in place to ``residual + x``,
            and the sum is what gets normalised (a decoder layer's pre-norm residual stream).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :func:`sparse_hf.kernels.dispatch.use_triton`).

    Returns:
        ``[..., N]`` normalised, in the promoted dtype of ``weight`` and ``x`` (as :func:`~.reference.rms_norm_ref`).
    """
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [{N}] for x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if (not use_triton(backend, _rms_norm_kernel, *tensors)
            or (residual is not None and not residual.is_contiguous())):
        return rms_norm_ref(x, weight, eps, residual)
    x2 = _rows(x)
    T = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    if T == 0:
        return out
    r2 = residual.view(T, N) if residual is not None else x2
    block = next_pow2(N)
    _rms_norm_kernel[(T,)](x2, r2, weight, out.view(T, N), N, float(eps), x2.stride(0), r2.stride(0), N,
                           HAS_RES=residual is not None, BLOCK_N=block, num_warps=min(16, max(1, block // 256)))
    return out


def rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             num_heads: int, num_kv_heads: int, q_norm: torch.Tensor | None = None,
             k_norm: torch.Tensor | None = None, eps: float = 1e-6, k_pool: torch.Tensor | None = None,
             v_pool: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None, backend: str = "auto"):
    """RoPE on q and k of a fused QKV projection in place (after Qwen3's per-head q/k RMSNorm when ``q_norm`` and
    ``k_norm`` are given), and, with a pool, the store of k and v at ``slot_mapping``; one launch on the GPU.

    Args:
        qkv: ``[T, (H + 2 * Hkv) * D]`` with a contiguous last dim; q and k are rewritten in place.
        positions: ``[T]`` int absolute positions (rows of ``cos``/``sin``).
        cos, sin: ``[P, D]`` RoPE tables (both halves equal, as transformers' ``cat([freqs, freqs])``).
        num_heads, num_kv_heads: ``H``, ``Hkv``.
        q_norm, k_norm: optional ``[D]`` per-head RMSNorm weights; eps: their epsilon.
        k_pool, v_pool: optional ``[S, Hkv, D]`` slot pools (last dim contiguous); slot_mapping: ``[T]`` int,
            token ``t``'s slot (``-1``: not stored).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D])`` views of ``qkv``.
    """
    T = qkv.shape[0]
    D = cos.shape[-1]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * D or positions.shape != (T,):
        raise ValueError(f"rope_qkv: qkv {tuple(qkv.shape)} must be [T, (H + 2 * Hkv) * D] = [T, "
                         f"{(num_heads + 2 * num_kv_heads) * D}] and positions {tuple(positions.shape)} [T]")
    if (q_norm is None) != (k_norm is None) or (k_pool is None) != (slot_mapping is None) \
            or (k_pool is None) != (v_pool is None):
        raise ValueError("rope_qkv: pass q_norm with k_norm, and k_pool, v_pool with slot_mapping (or neither)")
    store = k_pool is not None
    fast = (use_triton(backend, _rope_qkv_kernel, qkv, cos, sin) and qkv.stride(-1) == 1 and D % 2 == 0
            and cos.stride(-1) == 1 and sin.stride(-1) == 1
            and (not store or (k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1
                               and k_pool.shape[1:] == (num_kv_heads, D) and v_pool.shape[1:] == (num_kv_heads, D))))
    if not fast:
        return rope_qkv_ref(qkv, positions, cos, sin, num_heads, num_kv_heads, q_norm, k_norm, eps, k_pool, v_pool,
                            slot_mapping)
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    views = q.view(T, num_heads, D), k.view(T, num_kv_heads, D), v.view(T, num_kv_heads, D)
    if T == 0:
        return views
    norm = q_norm is not None
    kp, vp = (k_pool, v_pool) if store else (qkv, qkv)
    _rope_qkv_kernel[(T,)](
        qkv, positions, cos, sin, q_norm if norm else cos, k_norm if norm else cos, kp, vp,
        slot_mapping if store else positions,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        kp.stride(0) if store else 0, kp.stride(1) if store else 0,
        vp.stride(0) if store else 0, vp.stride(1) if store else 0, float(eps),
        H=num_heads, HKV=num_kv_heads, D=D, HALF=D // 2, BLOCK_H=next_pow2(num_heads),
        BLOCK_HKV=next_pow2(num_kv_heads), BLOCK_HALF=max(2, next_pow2(D // 2)), QK_NORM=norm, STORE=store,
        num_warps=4)
    return views


def silu_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection ``[T, 2 * I]`` (gate first) -> ``[T, I]``; one launch."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dim of gate_up {tuple(gate_up.shape)} must be even (gate, up)")
    if not use_triton(backend, _silu_mul_kernel, gate_up):
        return silu_mul_ref(gate_up)
    gu = _rows(gate_up)
    T, I = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or I == 0:
        return out
    block = min(1024, next_pow2(I))
    _silu_mul_kernel[(T, triton.cdiv(I, block))](gu, out.view(T, I), I, gu.stride(0), I, BLOCK=block, num_warps=4)
    return out
