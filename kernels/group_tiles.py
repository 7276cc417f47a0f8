"""Triton building blocks shared by the flash-decoding kernels (:mod:`.sparse_decode`, :mod:`.decode_scores`).

Both kernels run one program per ``(b * Hkv + kvh, split)``: the ``G = H // Hkv`` query heads of one KV group
share every K/V tile (a ``[BLOCK_G, BLOCK_N]`` ``tl.dot``), keep an online softmax in the log2 domain, and write
either the final output or a normalised split-K partial plus its log2-sum-exp2 (merged by
:func:`~sparse_hf.kernels.sparse_decode.merge_splits`). These helpers are that common prologue, inner step and
epilogue, so the two kernels differ only in which keys they visit.
"""

from __future__ import annotations

from .dispatch import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def load_group_query(Q, sq_b, sq_h, sq_d, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
        """This program's (batch row ``b``, KV head ``kvh``), its head/dim offsets and masks, and the group's
        queries ``q [BLOCK_G, BLOCK_D]`` (rows past ``G`` / columns past ``D`` are 0)."""
        pid = tl.program_id(0)
        b = (pid // HKV).to(tl.int64)
        kvh = (pid % HKV).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gm = g < G
        dm = d < D
        heads = kvh * G + g
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d, mask=gm[:, None] & dm[None, :],
                    other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        return b, kvh, d, gm, dm, heads, q

    @triton.jit
    def online_softmax_step(s, vt, m, l, acc, PREC: tl.constexpr):
        """Fold one tile into the running softmax: ``s [BLOCK_G, BLOCK_N]`` log2-domain logits (``-inf`` where
        masked), ``vt [BLOCK_N, BLOCK_D]`` values; ``m``/``l`` ``[BLOCK_G]`` running max and sum, ``acc``
        ``[BLOCK_G, BLOCK_D]`` unnormalised output. Returns the updated ``(m, l, acc)``."""
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        return m_new, l, acc

    @triton.jit
    def store_group_output(acc, m, l, OP, LP, OUT, b, heads, d, gm, dm, sp, num_splits, so_b, so_h, so_d,
                           HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr):
        """Write ``acc / l``: with ``SPLIT``, as the fp32 partial of split ``sp`` (``OP [B, H, S, D]``) plus its
        log2-sum-exp2 (``LP [B, H, S]``, ``-inf`` for an empty split); else straight into ``OUT [B, H, D]``."""
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        if SPLIT:
            row = (b * (HKV * G) + heads) * num_splits + sp                       # partials are contiguous
            tl.store(OP + row[:, None] * D + d[None, :], o, mask=gm[:, None] & dm[None, :])
            tl.store(LP + row, tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf")), mask=gm)
        else:
            tl.store(OUT + b * so_b + heads[:, None] * so_h + d[None, :] * so_d,
                     o.to(OUT.dtype.element_ty), mask=gm[:, None] & dm[None, :])
else:  # pragma: no cover - exercised only without triton
    load_group_query = online_softmax_step = store_group_output = None
