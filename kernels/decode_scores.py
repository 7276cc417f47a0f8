"""Decode attention that also emits per-token scores, and SnapKV prefill scores.

Why: a filter layer (OmniKV-style) needs, at each decode step, both its full attention output and the attention
logits of every cached token to choose the tokens later layers will read. Computing the logits in the same
pass as the attention reads K once instead of twice.

:func:`decode_attention_with_scores` uses the same flash-decoding layout as
:mod:`sparse_hf.kernels.sparse_decode`: program ``(b * Hkv + kvh, split)`` covers the ``G`` query heads of one
KV group over one chunk of positions, merged by log-sum-exp (:func:`~sparse_hf.kernels.sparse_decode.merge_splits`).
:func:`snapkv_prefill_scores` scores prompt tokens for SnapKV in two passes (log-sum-exp per window query,
then per-key probabilities reduced over the window and the group) without materialising ``[B, H, W, L]``.
"""

from __future__ import annotations

import torch

from .dispatch import DECODE_PROGRAMS_PER_SM, HAS_TRITON, next_pow2, plan_splits, tl, triton, use_triton
from .reference import (HEAD_REDUCES, SCORE_MODES, _check_gqa, decode_attention_with_scores_ref,
                        snapkv_prefill_scores_ref)
from .group_tiles import load_group_query, online_softmax_step, store_group_output
from .sparse_decode import LOG2E, dot_config, merge_splits

if HAS_TRITON:

    @triton.jit
    def _decode_scores_kernel(
        Q, K, V, LEN, VALID, SLOT, OP, LP, OUT, SC,
        scale, L, split_size, num_splits,
        sq_b, sq_h, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d, sva_b, sva_l, sst_b, sst_l,
        so_b, so_h, so_d, ss_b, ss_h, ss_l,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_VALID: tl.constexpr, GROUP_MAX: tl.constexpr, SPLIT: tl.constexpr,
        DOT_F32: tl.constexpr, PREC: tl.constexpr, HAS_SLOTS: tl.constexpr = False,
    ):
        sp = tl.program_id(1)
        b, kvh, d, gm, dm, heads, q = load_group_query(Q, sq_b, sq_h, sq_d, HKV, G, D, BLOCK_G, BLOCK_D, DOT_F32)
        len_b = L
        if HAS_LEN:
            len_b = tl.minimum(tl.load(LEN + b).to(tl.int32), L)
        start = sp * split_size
        end = tl.minimum(start + split_size, L)
        mid = tl.maximum(tl.minimum(end, len_b), start)    # [start, mid): attended, [mid, end): past length
        k_base = K + b * sk_b + kvh * sk_h
        v_base = V + b * sv_b + kvh * sv_h
        if GROUP_MAX:
            sc_base = SC + b * ss_b + kvh * ss_h
        else:
            sc_base = SC + b * ss_b + heads[:, None] * ss_h

        m = tl.full([BLOCK_G], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, mid, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            inr = offs < mid
            ok = inr
            if HAS_VALID:
                ok = ok & (tl.load(VALID + b * sva_b + offs * sva_l, mask=inr, other=0) != 0)
            kv_mask = ok[:, None] & dm[None, :]
            at = offs.to(tl.int64)
            if HAS_SLOTS:                                   # position j lives at slot SLOT[b, j] of the pool
                at = tl.load(SLOT + b * sst_b + offs * sst_l, mask=ok, other=0).to(tl.int64)
            kt = tl.load(k_base + at[:, None] * sk_l + d[None, :] * sk_d, mask=kv_mask, other=0.0)
            vt = tl.load(v_base + at[:, None] * sv_l + d[None, :] * sv_d, mask=kv_mask, other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale           # natural-log logits
            s = tl.where(ok[None, :], s, float("-inf"))
            if GROUP_MAX:
                tl.store(sc_base + offs * ss_l, tl.max(tl.where(gm[:, None], s, float("-inf")), 0), mask=inr)
            else:
                tl.store(sc_base + offs[None, :] * ss_l, s, mask=gm[:, None] & inr[None, :])
            m, l, acc = online_softmax_step(s * 1.4426950408889634, vt, m, l, acc, PREC)
        for n0 in range(mid, end, BLOCK_N):                  # keys past lengths[b]: scores only
            offs = n0 + tl.arange(0, BLOCK_N)
            inr = offs < end
            if GROUP_MAX:
                tl.store(sc_base + offs * ss_l, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=inr)
            else:
                tl.store(sc_base + offs[None, :] * ss_l, tl.full([BLOCK_G, BLOCK_N], float("-inf"), tl.float32),
                         mask=gm[:, None] & inr[None, :])
        store_group_output(acc, m, l, OP, LP, OUT, b, heads, d, gm, dm, sp, num_splits, so_b, so_h, so_d,
                           HKV, G, D, SPLIT)

    @triton.jit
    def _snapkv_kernel(
        Q, K, CAND, QV, LSE, OUT,
        qk_scale, L, W, split_size, lse_cols,
        sq_b, sq_h, sq_w, sq_d, sk_b, sk_h, sk_l, sk_d, sc_b, sc_h, sc_l, sqv_b, sqv_w,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        SCORE_PASS: tl.constexpr, HAS_QV: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        # Rows r = g * BLOCK_W + w are (query head of the group, window query). Pass 1 (SCORE_PASS=False):
        # per-row log2-sum-exp2 over this program's key chunk -> LSE[b, kvh, r, split]. Pass 2: per-key
        # probabilities exp2(s - lse), mean over window queries, max over the group's heads -> OUT[b, kvh, l].
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = (pid // HKV).to(tl.int64)
        kvh = (pid % HKV).to(tl.int64)
        BLOCK_R: tl.constexpr = BLOCK_G * BLOCK_W
        r = tl.arange(0, BLOCK_R)
        g = r // BLOCK_W
        w = r % BLOCK_W
        rm = (g < G) & (w < W)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        q = tl.load(Q + b * sq_b + (kvh * G + g)[:, None] * sq_h + w[:, None] * sq_w + d[None, :] * sq_d,
                    mask=rm[:, None] & dm[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        start = sp * split_size
        end = tl.minimum(start + split_size, L)
        k_base = K + b * sk_b + kvh * sk_h
        c_base = CAND + b * sc_b + kvh * sc_h
        lse_row = LSE + ((b * HKV + kvh) * BLOCK_R + r) * lse_cols
        if SCORE_PASS:
            lse = tl.load(lse_row, mask=rm, other=float("-inf"))
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            wq = rm.to(tl.float32)
            if HAS_QV:
                wq = wq * (tl.load(QV + b * sqv_b + w * sqv_w, mask=rm, other=0) != 0).to(tl.float32)
            cnt = tl.maximum(tl.sum(wq, 0) / G, 1.0)
        m = tl.full([BLOCK_R], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            ok = (offs < end) & (tl.load(c_base + offs * sc_l, mask=offs < end, other=0) != 0)
            kt = tl.load(k_base + offs[:, None] * sk_l + d[None, :] * sk_d, mask=ok[:, None] & dm[None, :], other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
            if SCORE_PASS:
                p = tl.where(ok[None, :], tl.exp2(s - lse[:, None]), 0.0) * wq[:, None]
                mean = tl.sum(tl.reshape(p, (BLOCK_G, BLOCK_W, BLOCK_N)), 1) / cnt       # [BLOCK_G, BLOCK_N]
                tl.store(OUT + (b * HKV + kvh) * L + offs, tl.max(mean, 0), mask=offs < end)
            else:
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
                m = m_new
        if not SCORE_PASS:
            tl.store(lse_row + sp, tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf")))
else:  # pragma: no cover - exercised only without triton
    _decode_scores_kernel = None
    _snapkv_kernel = None


def decode_attention_with_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 lengths: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                                 scale: float | None = None, score_mode: str = "per_head", backend: str = "auto",
                                 *, split_size: int | None = None, slots: torch.Tensor | None = None):
    """Full decode attention of one query token plus per-token logits, in one pass over K.

    Args:
        q: ``[B, H, D]`` current-token queries.
        k, v: ``[B, Hkv, L, D]`` caches with any strides (same dtype); query head ``h`` reads KV head ``h // G``.
        lengths: optional ``[B]`` int; row ``b`` attends keys ``j < lengths[b]`` (default ``L``).
        valid: optional ``[B, L]`` bool; key ``j`` of row ``b`` is attended only where ``valid[b, j]``.
        scale: softmax scale, default ``D ** -0.5``.
        score_mode: ``"per_head"`` -> fp32 ``[B, H, L]`` raw logits ``scale * q.k``; ``"group_max"`` -> ``[B, Hkv, L]``
            max over each KV group's query heads; ``"all_max"`` -> ``[B, L]`` max over all heads.
            Masked positions are ``-inf``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        split_size: positions per split-K chunk; default picks one to fill the GPU.
        slots: optional ``[B, L]`` int slot table: ``k``/``v`` are then a slot pool ``[B, Hkv, S, D]`` (e.g. a
            ``[S, Hkv, D]`` pool viewed with stride 0 over rows) and position ``j`` of row ``b`` is read from slot
            ``slots[b, j]`` in place (an engine's observation layer: no gathered copy of the row's K/V). Entries
            past ``lengths`` / outside ``valid`` are not read.

    Returns:
        ``(out, scores)``: ``out`` ``[B, H, D]`` in ``q.dtype`` (zeros for a row with no attended key).
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    B, H, D, Hkv, L, G = _check_gqa(q, k)
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    if slots is not None:
        if slots.dim() != 2 or slots.shape[0] != B:
            raise ValueError(f"slots must be a [B={B}, L] slot table, got {tuple(slots.shape)}")
        L = slots.shape[1]
    if not use_triton(backend, _decode_scores_kernel, q, k, v):
        if slots is not None:                          # the reference reads a gathered copy
            idx = slots.long().clamp(0, k.shape[2] - 1).view(B, 1, L, 1)
            k = k.gather(2, idx.expand(B, Hkv, L, k.shape[-1]))
            v = v.gather(2, idx.expand(B, Hkv, L, v.shape[-1]))
        return decode_attention_with_scores_ref(q, k, v, lengths, valid, scale, score_mode)
    if v.dtype != k.dtype:
        raise TypeError(f"k and v dtypes differ: {k.dtype} vs {v.dtype}")
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    out = torch.empty(B, H, D, dtype=q.dtype, device=dev)
    group_max = score_mode != "per_head"
    sc = torch.empty(B, Hkv if group_max else H, L, dtype=torch.float32, device=dev)
    if L == 0 or B == 0:
        return out.zero_(), (sc.amax(1) if score_mode == "all_max" else sc)
    qk = q if q.dtype == k.dtype else q.to(k.dtype)
    split_size, S, block_n = plan_splits(L, B * Hkv, dev, split_size, programs_per_sm=DECODE_PROGRAMS_PER_SM)
    if S > 1:
        o_part = torch.empty(B, H, S, D, dtype=torch.float32, device=dev)
        lse_part = torch.empty(B, H, S, dtype=torch.float32, device=dev)
    else:
        o_part = lse_part = out
    # The kernel reads entry b at LEN + b: a strided view (a row of a [G, B] table) must be made contiguous.
    lens = lengths.to(device=dev, dtype=torch.int32).contiguous() if lengths is not None else out
    if valid is not None:
        val = valid.to(device=dev, dtype=torch.bool).expand(B, L).view(torch.uint8)
        sva = val.stride()
    else:
        val, sva = out, (0, 0)
    dot_f32, prec = dot_config(_decode_scores_kernel, k.dtype)
    slot_table, sst = (slots, slots.stride()) if slots is not None else (out, (0, 0))
    _decode_scores_kernel[(B * Hkv, S)](
        qk, k, v, lens, val, slot_table, o_part, lse_part, out, sc,
        scale, L, split_size, S,
        *qk.stride(), *k.stride(), *v.stride(), *sva, *sst, *out.stride(), *sc.stride(),
        HKV=Hkv, G=G, D=D, BLOCK_G=max(16, next_pow2(G)), BLOCK_D=max(16, next_pow2(D)), BLOCK_N=block_n,
        HAS_LEN=lengths is not None, HAS_VALID=valid is not None, GROUP_MAX=group_max, SPLIT=S > 1,
        DOT_F32=dot_f32, PREC=prec, HAS_SLOTS=slots is not None, num_warps=4,
    )
    if S > 1:
        merge_splits(o_part, lse_part, out)
    if score_mode == "all_max":
        sc = sc.amax(1)
    return out, sc


def snapkv_prefill_scores(q_window: torch.Tensor, k: torch.Tensor, candidate_mask: torch.Tensor,
                          scale: float | None = None, query_valid: torch.Tensor | None = None,
                          backend: str = "auto", *, head_reduce: str = "group",
                          split_size: int | None = None) -> torch.Tensor:
    """SnapKV importance of every key for an observation window of prompt queries.

    Per query head and window query: softmax of ``scale * q.k`` over the candidate keys only; mean over the
    (valid) window queries; max over the query heads of each KV group (``head_reduce="group"``) or over all
    heads of the layer (``"all"``). Max-pooling along ``L`` commutes with these maxima, so callers pool the
    result (``[B, Hkv, L]``) instead of every head's ``[B, H, L]``. Neither backend materialises ``[B, H, W, L]``:
    Triton streams keys twice (log-sum-exp, then probabilities); the torch reference walks the window in chunks.

    Args:
        q_window: ``[B, H, W, D]`` the last ``W`` prompt queries; k: ``[B, Hkv, L, D]`` any strides.
        candidate_mask: ``[B, L]`` or ``[B, Hkv, L]`` bool, keys that may be chosen.
        scale: default ``D ** -0.5``; query_valid: optional ``[B, W]`` bool (default: all window queries real).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; split_size: keys per chunk of the log-sum-exp pass.
        head_reduce: ``"group"`` (per KV head) or ``"all"`` (one score per token for the whole layer).

    Returns:
        float32 ``[B, Hkv, L]`` (``"group"``) or ``[B, 1, L]`` (``"all"``); non-candidates are 0.
    """
    B, H, W, D = q_window.shape
    Hkv, L = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % Hkv:
        raise ValueError(f"shape mismatch: q_window {tuple(q_window.shape)}, k {tuple(k.shape)}")
    if head_reduce not in HEAD_REDUCES:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCES}, got {head_reduce!r}")
    if not use_triton(backend, _snapkv_kernel, q_window, k):
        return snapkv_prefill_scores_ref(q_window, k, candidate_mask, scale, query_valid, head_reduce)
    G, dev = H // Hkv, k.device
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.zeros(B, Hkv, L, dtype=torch.float32, device=dev)
    if L == 0 or W == 0 or B == 0:
        return out[:, :1] if head_reduce == "all" else out
    qk = q_window if q_window.dtype == k.dtype else q_window.to(k.dtype)
    cand = candidate_mask.to(device=dev, dtype=torch.bool)
    cand = (cand.view(B, 1, L) if cand.dim() == 2 else cand).expand(B, Hkv, L).view(torch.uint8)
    qv = query_valid.to(device=dev, dtype=torch.bool).view(torch.uint8) if query_valid is not None else None
    bg, bw = next_pow2(G), next_pow2(W)
    bw = max(bw, 16 // min(bg, 16))                         # tl.dot needs >= 16 rows
    split_size, S, block_n = plan_splits(L, B * Hkv, dev, split_size, max_block=32 if bg * bw >= 256 else 64)
    lse = torch.empty(B, Hkv, bg * bw, S, dtype=torch.float32, device=dev)
    dot_f32, prec = dot_config(_snapkv_kernel, k.dtype)
    args = (qk, k, cand, qv if qv is not None else cand, lse, out, scale * LOG2E, L, W)
    strides = (*qk.stride(), *k.stride(), *cand.stride(), *(qv.stride() if qv is not None else (0, 0)))
    meta = dict(HKV=Hkv, G=G, D=D, BLOCK_G=bg, BLOCK_W=bw, BLOCK_D=max(16, next_pow2(D)), BLOCK_N=block_n,
                HAS_QV=qv is not None, DOT_F32=dot_f32, PREC=prec, num_warps=8 if bg * bw >= 128 else 4)
    _snapkv_kernel[(B * Hkv, S)](*args, split_size, S, *strides, SCORE_PASS=False, **meta)
    m = lse.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = (m + torch.log2(torch.exp2(lse - m).sum(-1, keepdim=True))).contiguous()   # [B, Hkv, R, 1]
    _snapkv_kernel[(B * Hkv, -(-L // block_n))](*args[:4], lse, *args[5:], block_n, 1, *strides,
                                                SCORE_PASS=True, **meta)
    return out.amax(1, keepdim=True) if head_reduce == "all" else out
