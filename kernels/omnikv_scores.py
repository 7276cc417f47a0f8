"""OmniKV's decode-step token scores from an observation layer's logits, in two Triton passes.

An observation layer's decode step scores every candidate token (neither sink nor recent) by a per-head softmax
of its logits over the candidates, then the max over heads (:func:`sparse_hf.methods.omnikv.omnikv_decode_scores`,
the specification). In torch that is a masked fill, a softmax, a ``nan_to_num``, an ``amax`` and a second masked
fill over ``[B, H, L]`` float32 logits, plus about ten ops building the candidate mask: at one 128K row and 28
heads, ~0.1 ms of small kernels per observation layer. Here the candidates of row ``b`` are a range of slots
``[lo, hi[b])`` (an engine row's slot table is in position order, so its sinks are the first ``lo`` slots and its
recent tokens the last ones before ``lengths[b]``), and

1. :func:`_range_softmax_stats_kernel` -- per ``(row, head, split)``: the max and the sum of ``exp(s - max)`` of
   the split's candidates;
2. :func:`_range_softmax_max_kernel` -- per ``(row, block of slots)``: every head's softmax from the merged
   statistics, and the max over heads (``-inf`` outside the candidates).

Each pass reads the logits once; nothing syncs with the host (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _range_softmax_stats_kernel(S, HI, LO, M, Z, lo, L, split_size, num_splits,
                                    ss_b, ss_h, ss_l, BLOCK: tl.constexpr, H: tl.constexpr, ROW_LO: tl.constexpr):
        pid = tl.program_id(0)                     # b * H + h
        sp = tl.program_id(1)
        b = (pid // H).to(tl.int64)
        h = (pid % H).to(tl.int64)
        hi = tl.minimum(tl.load(HI + b).to(tl.int64), L)
        if ROW_LO:
            lo = tl.load(LO + b).to(tl.int64)
        start = tl.maximum(sp * split_size, lo)
        end = tl.minimum(sp * split_size + split_size, hi)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK], tl.float32)
        for n0 in range(start, end, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            s = tl.load(S + b * ss_b + h * ss_h + offs * ss_l, mask=offs < end, other=float("-inf"))
            m_new = tl.maximum(m, s)
            safe_new = tl.where(m_new == float("-inf"), 0.0, m_new)      # exp(-inf - safe) = 0, never inf - inf
            z = z * tl.exp(m - safe_new) + tl.exp(s - safe_new)
            m = m_new
        mx = tl.max(m, 0)
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.sum(z * tl.exp(m - safe), 0)
        tl.store(M + pid * num_splits + sp, mx)
        tl.store(Z + pid * num_splits + sp, tot)

    @triton.jit
    def _range_softmax_max_kernel(S, HI, LO, M, Z, OUT, lo, L, num_splits, ss_b, ss_h, ss_l, so_b,
                                  H: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, ROW_LO: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        hi = tl.minimum(tl.load(HI + b).to(tl.int64), L)
        if ROW_LO:
            lo = tl.load(LO + b).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        cand = (offs >= lo) & (offs < hi)
        sp = tl.arange(0, BLOCK_S)
        spm = sp < num_splits
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for h in range(H):
            ms = tl.load(M + (b * H + h) * num_splits + sp, mask=spm, other=float("-inf"))
            zs = tl.load(Z + (b * H + h) * num_splits + sp, mask=spm, other=0.0)
            mh = tl.max(ms, 0)
            safe = tl.where(mh == float("-inf"), 0.0, mh)
            zh = tl.sum(zs * tl.exp(ms - safe), 0)
            s = tl.load(S + b * ss_b + h * ss_h + offs * ss_l, mask=cand, other=float("-inf"))
            p = tl.exp(s - safe) / tl.where(zh > 0, zh, 1.0)                  # 0 where s is -inf
            best = tl.maximum(best, p)
        tl.store(OUT + b * so_b + offs, tl.where(cand, best, float("-inf")), mask=offs < L)
else:  # pragma: no cover - exercised only without triton
    _range_softmax_stats_kernel = _range_softmax_max_kernel = None


def range_softmax_max_kernel_runs(logits: torch.Tensor, backend: str = "auto") -> bool:
    """Whether :func:`range_softmax_max` runs its Triton kernels for these logits and ``backend`` (else the caller
    uses the torch specification, :func:`~sparse_hf.methods.omnikv.omnikv_decode_scores`)."""
    return use_triton(backend, _range_softmax_stats_kernel, logits)


#: Slots per program of the second pass (:func:`_range_softmax_max_kernel`). Each program loops over the ``H`` heads
#: one load after another, so the pass is latency-bound and wants many programs: run M's engine DeltaKV profile at
#: 131072 x 1 (H200, 2026-12-02, ``docs/bench/run_m_2026-12-02/profile_deltakv.txt``) timed it at 18.3 us with 1024
#: (128 programs, ~0.8 TB/s for the 14.7 MB of logits) against 8.8 us for the first pass's 448 programs. A block changes only which program computes a slot,
#: not the slot's arithmetic (the statistics are merged the same way in every program): the scores are the same
#: bits at any block (``tests/test_omnikv_scores_kernel.py``).
MAX_PASS_BLOCK = 256


def range_softmax_max(logits: torch.Tensor, lo: int | torch.Tensor, hi: torch.Tensor, *, split_size: int = 8192,
                      block: int = 1024, max_block: int = MAX_PASS_BLOCK) -> torch.Tensor:
    """OmniKV decode scores for candidate ranges: ``logits [B, H, L]`` float32, candidates of row ``b`` the slots
    ``lo <= j < hi[b]`` (``hi [B]`` int, on the device; ``lo`` a host int for every row, or ``[B]`` int on the device,
    e.g. each row's padding plus its sinks on the HF path) -> ``[B, L]`` float32: ``max_h softmax_h(logits)`` over the
    candidates, ``-inf`` elsewhere (all ``-inf`` for a row without candidates). Triton only (see
    :func:`range_softmax_max_kernel_runs`); the torch specification is ``omnikv_decode_scores(logits, cand)``.
    ``block``: slots per step of the first pass (its statistics' lanes); ``max_block``: slots per program of the
    second (:data:`MAX_PASS_BLOCK`; the result does not depend on it)."""
    if logits.dtype != torch.float32 or logits.dim() != 3:
        raise ValueError(f"logits must be [B, H, L] float32, got {tuple(logits.shape)} {logits.dtype}")
    B, H, L = logits.shape
    out = torch.empty(B, L, dtype=torch.float32, device=logits.device)
    if B * L == 0:
        return out
    hi = hi.to(device=logits.device, dtype=torch.int32).contiguous()
    row_lo = isinstance(lo, torch.Tensor)
    lo_rows = lo.to(device=logits.device, dtype=torch.int32).contiguous() if row_lo else hi
    lo = 0 if row_lo else int(lo)
    split_size = max(block, min(split_size, next_pow2(L)))
    num_splits = triton.cdiv(L, split_size)
    m = torch.empty(B * H, num_splits, dtype=torch.float32, device=logits.device)
    z = torch.empty_like(m)
    _range_softmax_stats_kernel[(B * H, num_splits)](logits, hi, lo_rows, m, z, lo, L, split_size, num_splits,
                                                     *logits.stride(), BLOCK=block, H=H, ROW_LO=row_lo, num_warps=4)
    _range_softmax_max_kernel[(B, triton.cdiv(L, max_block))](logits, hi, lo_rows, m, z, out, lo, L, num_splits,
                                                              *logits.stride(), out.stride(0), H=H, BLOCK=max_block,
                                                              BLOCK_S=max(2, next_pow2(num_splits)), ROW_LO=row_lo,
                                                              num_warps=4)
    return out
