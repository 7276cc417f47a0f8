"""Sparse decode attention: one query token per sequence attends to a given list of cache positions.

Why: sparse-KV methods (OmniKV, DeltaKV, top-k selection) decide per KV head which cached tokens a decode step
should read. Gathering those rows into a new tensor costs an extra write+read of ``K * D`` per head; this kernel
reads the selected K/V rows *in place* from the cache, whatever its strides (a view ``buf[:, :, :len]`` of a
preallocated buffer, or a shared slot pool expanded over the batch with stride 0).

Layout of the work (flash-decoding): program ``(b * Hkv + kvh, split)`` handles the ``G = H // Hkv`` query heads
of one KV group (each K/V row is loaded once per group and fed to a small ``tl.dot``) over one chunk of the
index list, with an online softmax in fp32. With more than one chunk, every program writes a normalised partial
output and its log-sum-exp, and :func:`merge_splits` combines them; so a single long sequence still spreads over
many SMs.
"""

from __future__ import annotations

import torch

from .dispatch import (DECODE_PROGRAMS_PER_SM, HAS_TRITON, is_interpreted, next_pow2, plan_splits, tl, triton,
                       use_triton)
from .group_tiles import load_group_query, online_softmax_step, store_group_output
from .reference import _check_gqa, sparse_decode_attention_ref

LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _sparse_decode_kernel(
        Q, K, V, IDX, NIDX, OP, LP, OUT,
        qk_scale, L, n_idx, split_size, num_splits,
        sq_b, sq_h, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d, si_b, si_h, si_k,
        so_b, so_h, so_d,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_NIDX: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
        DENSE: tl.constexpr,
    ):
        sp = tl.program_id(1)
        b, kvh, d, gm, dm, heads, q = load_group_query(Q, sq_b, sq_h, sq_d, HKV, G, D, BLOCK_G, BLOCK_D, DOT_F32)
        n_b = n_idx
        if HAS_NIDX:
            n_b = tl.minimum(tl.load(NIDX + b).to(tl.int32), n_idx)
        start = sp * split_size
        end = tl.minimum(start + split_size, n_b)
        k_base = K + b * sk_b + kvh * sk_h
        v_base = V + b * sv_b + kvh * sv_h
        i_base = IDX + b * si_b + kvh * si_h

        m = tl.full([BLOCK_G], -1.0e30, tl.float32)      # running max (log2 domain), finite: no inf-inf NaN
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            idx = tl.load(i_base + offs * si_k, mask=offs < end, other=-1).to(tl.int64)
            if DENSE:   # IDX is a per-slot table (e.g. positions): slot j reads row j where IDX[j] >= 0
                ok = (offs < end) & (idx >= 0) & (offs < L)
                idx = offs.to(tl.int64)
            else:
                ok = (offs < end) & (idx >= 0) & (idx < L)
            kv_mask = ok[:, None] & dm[None, :]
            kt = tl.load(k_base + idx[:, None] * sk_l + d[None, :] * sk_d, mask=kv_mask, other=0.0)
            vt = tl.load(v_base + idx[:, None] * sv_l + d[None, :] * sv_d, mask=kv_mask, other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale          # [BLOCK_G, BLOCK_N]
            m, l, acc = online_softmax_step(tl.where(ok[None, :], s, float("-inf")), vt, m, l, acc, PREC)
        store_group_output(acc, m, l, OP, LP, OUT, b, heads, d, gm, dm, sp, num_splits, so_b, so_h, so_d,
                           HKV, G, D, SPLIT)

    @triton.jit
    def _merge_splits_kernel(OP, LP, OUT, num_splits, H, so_b, so_h, so_d,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H
        h = pid % H
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        sa = tl.arange(0, BLOCK_S)
        lp = LP + pid * num_splits
        mv = tl.full([BLOCK_S], -1.0e30, tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            mv = tl.maximum(mv, tl.load(lp + s0 + sa, mask=s0 + sa < num_splits, other=float("-inf")))
        m = tl.max(mv, 0)
        lv = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            sm = s0 + sa < num_splits
            w = tl.exp2(tl.load(lp + s0 + sa, mask=sm, other=float("-inf")) - m)    # empty split -> 0
            o = tl.load(OP + (pid * num_splits + s0 + sa)[:, None] * D + d[None, :],
                        mask=sm[:, None] & dm[None, :], other=0.0)
            acc += tl.sum(w[:, None] * o, 0)
            lv += w
        l = tl.sum(lv, 0)
        out = acc / tl.where(l > 0, l, 1.0)
        tl.store(OUT + b * so_b + h * so_h + d * so_d, out.to(OUT.dtype.element_ty), mask=dm)
else:  # pragma: no cover - exercised only without triton
    _sparse_decode_kernel = None
    _merge_splits_kernel = None


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Combine split-K partials into ``out``.

    Args:
        o_part: ``[B, H, S, D]`` fp32 contiguous, each split's softmax-normalised output.
        lse_part: ``[B, H, S]`` fp32 contiguous, each split's log2-sum-exp2 (``-inf`` for an empty split).
        out: ``[B, H, D]`` destination (any strides); rows whose splits are all empty become 0.
    """
    B, H, S, D = o_part.shape
    _merge_splits_kernel[(B * H,)](o_part, lse_part, out, S, H, out.stride(0), out.stride(1), out.stride(2),
                                   D=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_S=min(64, next_pow2(S)))
    return out


def dot_config(kernel, dtype: torch.dtype) -> tuple[bool, str | None]:
    """``(DOT_F32, PREC)`` for ``tl.dot``: fp32 inputs use exact ("ieee") products, not TF32, because the
    scores drive token selection; bf16 is upcast under the interpreter, whose bf16 ``tl.dot`` returns garbage."""
    dot_f32 = is_interpreted(kernel) and dtype == torch.bfloat16
    return dot_f32, ("ieee" if dot_f32 or dtype == torch.float32 else None)     # None: backend default


def sparse_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                            num_indices: torch.Tensor | None = None, scale: float | None = None,
                            backend: str = "auto", *, split_size: int | None = None, dense: bool = False,
                            block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """Attention of one query token per sequence over a list of cache positions, read in place.

    Args:
        q: ``[B, H, D]`` current-token queries.
        k, v: ``[B, Hkv, L, D]`` caches with any strides (stride 0 over the batch is fine); same dtype.
            Query head ``h`` reads KV head ``h // (H // Hkv)``.
        indices: ``[B, Hkv, K]`` int32/int64 positions along ``L``, one list per KV head; entries ``< 0`` (padding)
            or ``>= L`` are ignored. Order does not matter.
        num_indices: optional ``[B]`` int; only the first ``num_indices[b]`` entries of row ``b`` are used.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :func:`sparse_hf.kernels.dispatch.use_triton`).
        split_size: index entries per split-K chunk; default picks one to fill the GPU.
        dense: ``indices`` is then a per-slot table ``[B, Hkv, L]`` (e.g. the cache's position table): slot ``j``
            is attended where ``indices[..., j] >= 0``. Saves building an index list every decode step.
        block_n, num_warps: the Triton tile (index entries per inner step, at most ``block_n``) and warps per
            program (launch tuning; the result does not depend on them beyond rounding).

    Returns:
        ``[B, H, D]`` in ``q.dtype`` (softmax in fp32; a row with no usable index gives zeros).
    """
    B, H, D, Hkv, L, G = _check_gqa(q, k)
    triton_ok = None
    if dense:
        if indices.shape[-1] != L:
            raise ValueError(f"dense=True needs a per-slot table [B, Hkv, {L}], got {tuple(indices.shape)}")
        triton_ok = use_triton(backend, _sparse_decode_kernel, q, k, v)
        if not triton_ok:
            slots = torch.arange(L, device=indices.device)
            return sparse_decode_attention_ref(q, k, v, torch.where(indices >= 0, slots, -1), num_indices, scale)
    if v.shape != k.shape or indices.shape[:2] != (B, Hkv):
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}; indices must be [B, Hkv, K], "
                         f"got {tuple(indices.shape)}")
    if triton_ok is None:
        triton_ok = use_triton(backend, _sparse_decode_kernel, q, k, v)
    if not triton_ok:
        return sparse_decode_attention_ref(q, k, v, indices, num_indices, scale)
    if v.dtype != k.dtype:
        raise TypeError(f"k and v dtypes differ: {k.dtype} vs {v.dtype}")
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    n = indices.shape[-1]
    if n == 0 or L == 0 or B == 0:
        return out.zero_()
    qk = q if q.dtype == k.dtype else q.to(k.dtype)
    split_size, S, block_n = plan_splits(n, B * Hkv, q.device, split_size, max_block=block_n,
                                         programs_per_sm=DECODE_PROGRAMS_PER_SM)
    if S > 1:
        o_part = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out                                                # unused
    # The kernel reads entry b at NIDX + b: a strided view (a row of a [G, B] table) must be made contiguous.
    nidx = num_indices.to(device=q.device, dtype=torch.int32).contiguous() if num_indices is not None else indices
    dot_f32, prec = dot_config(_sparse_decode_kernel, k.dtype)
    _sparse_decode_kernel[(B * Hkv, S)](
        qk, k, v, indices, nidx, o_part, lse_part, out,
        scale * LOG2E, L, n, split_size, S,
        *qk.stride(), *k.stride(), *v.stride(), *indices.stride(), *out.stride(),
        HKV=Hkv, G=G, D=D, BLOCK_G=max(16, next_pow2(G)), BLOCK_D=max(16, next_pow2(D)), BLOCK_N=block_n,
        HAS_NIDX=num_indices is not None, SPLIT=S > 1, DOT_F32=dot_f32, PREC=prec, DENSE=dense,
        num_warps=num_warps,
    )
    if S > 1:
        merge_splits(o_part, lse_part, out)
    return out
