"""Accumulated attention mass (H2O's token score) of a block of queries, without materialising the logits.

Why: H2O scores every slot by the total causal-softmax probability it receives from every query, summed over the
``G`` query heads of its KV head. The torch reference (:func:`attention_mass_ref`) walks the queries in blocks of
``[B, Hkv, G, block, L]`` float32 logits; at a 128K prompt that is terabytes of memory traffic per layer. The
Triton path streams keys twice instead, like :func:`~sparse_hf.kernels.decode_scores.snapkv_prefill_scores`:

- pass 1, one program per (row ``b``, KV head, block of query rows, key split): per query row (a query and one of
  the group's heads, stacked so that one key tile serves the group) the log2-sum-exp2 over its allowed keys
  (split-K partials merged in torch);
- pass 2, one program per (row ``b``, KV head, key block, query split): the probabilities ``exp2(s - lse)`` of that
  key block summed over the (valid) queries and the group's heads in fp32 (query-split partials summed in torch,
  no atomics: the result is deterministic).

Pass 1 recomputes what the prefill attention already knows: every query row's log-sum-exp over exactly the keys it
attends to. A caller whose attention returns it (the engine's prefill routes, the HF path's prefill through
:func:`attention_with_lse`) passes it as ``lse`` and only pass 2 runs: one ``q.k`` per (query row, key) pair beside
the attention instead of two (``benchmarks/bench_h2o_mass.py`` counts and times both).

Pass 2's shape (why): it is QK^T alone, half of attention's matmul work, plus one ``exp2`` per pair like the
attention, so near its floor it costs well under the attention. The key tile stays put while the loop streams
``[block_rows, D]`` tiles of one head's consecutive queries (plain 2D loads; the group's ``G`` heads take turns per
query block) with no branch in the loop body, so Triton can software-pipeline the loads (``num_stages``); the
loop starts at the first query that may see the tile (a binary search over the running max of the query
positions), not at the split's first query behind a per-step test; the softmax scale and ``log2(e)`` are one
multiply before ``exp2``; invalid queries (zero rows, ``lse`` +inf) and keys (dropped at the store) need no
per-element mask, the causal one is an int32 compare. Its tiles are :class:`MassConfig` (per call, for sweeps).

A key is allowed for a query when it is valid and its logical position is at most the query's (``key_pos <=
query_pos``), so chunks that attend to earlier slots and evicted (non-contiguous) positions are exact. Tiles that
no query of a block may see (every valid key after the block's last query) are skipped in both passes.

:func:`~sparse_hf.kernels.decode_mass.decode_attention_mass` (its own module) is the one-query case from the
logits that the decode attention returns anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import HAS_TRITON, next_pow2, plan_splits, tl, triton, use_triton
from .sparse_decode import LOG2E, dot_config

#: Elements of one ``[B, H, block, L]`` logits block of :func:`attention_mass_ref` (64 MiB in float32): a long
#: prompt scored chunk by chunk takes fewer queries per block instead of gigabytes of temporaries.
MASS_BLOCK_ELEMENTS = 1 << 24

#: Pass 1's tile (log-sum-exp): query rows (query x head pairs of a KV group) and keys.
LSE_BLOCK_ROWS, LSE_BLOCK_KEYS = 128, 64


class MassConfig(NamedTuple):
    """Pass 2's launch (the probability sums): ``block_rows`` consecutive queries of one head and ``block_keys``
    keys per tile (powers of two >= 16), ``num_warps``, ``num_stages`` (Triton's software pipelining of the query
    loop). ``None``: :func:`mass_config`'s default."""

    block_rows: int | None = None
    block_keys: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


#: Pass 2's default, from run P's sweep (H200, 2026-12-03, bf16, Qwen2.5-7B's 28/4 heads of 128,
#: ``benchmarks/bench_h2o_mass.py --device cuda --tokens 32768 --mass-block-rows 64,128 --mass-block-keys 64,128,256
#: --mass-warps 4,8 --mass-stages 2,3``, docs/bench/run_p_2026-12-03/callC2_*): 64 rows x 128 keys, 4 warps, 3
#: stages was the best of 24 tiles at 32K (0.79x cuDNN's causal attention) and of 12 at 128K (0.68x, 0.147 s; the
#: previous default with 8 warps 0.73x, run O's loop 2.93x). Below ``head_dim`` 128 the same 4 warps.
MASS_CONFIG = MassConfig(64, 128, 4, 3)


def mass_config(head_dim: int, config: MassConfig | tuple | None = None) -> MassConfig:
    """``config`` with its ``None`` entries (or all, for ``None``) from :data:`MASS_CONFIG` (4 warps where
    ``head_dim < 128``); raises ``ValueError`` for tiles the kernel cannot take."""
    given = MassConfig(*(config or ()))
    auto = MASS_CONFIG._replace(num_warps=MASS_CONFIG.num_warps if head_dim >= 128 else 4)
    cfg = MassConfig(*(a if g is None else int(g) for g, a in zip(given, auto)))
    if not (min(cfg.block_rows, cfg.block_keys) >= 16 and 1 <= cfg.num_warps <= 16 and cfg.num_stages >= 1
            and all(n == next_pow2(n) for n in cfg[:3])):
        raise ValueError(f"bad mass config {tuple(cfg)}: block_rows and block_keys powers of two >= 16, num_warps "
                         "a power of two <= 16, num_stages >= 1")
    return cfg


def attention_probabilities(logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last axis of ``logits`` whose masked entries are ``-inf``; a row with no allowed entry gets
    zeros (not NaN). ``lse`` (``logits.shape[:-1]``, natural log): each row's log-sum-exp over its allowed entries,
    known from the attention that computed it; then the softmax is ``exp(logits - lse)`` (no max/sum pass), and a
    row whose ``lse`` is NaN gets zeros too."""
    if lse is None:
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)
    # a row with no allowed entry (lse -inf) or a garbage lse (NaN: an invalid query) gets exp(s - inf) = 0
    lse = lse.to(logits.dtype).nan_to_num(nan=float("inf"), neginf=float("inf"))
    return (logits - lse.unsqueeze(-1)).exp_()


def attention_mass_ref(queries: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor,
                       query_pos: torch.Tensor, query_valid: torch.Tensor | None, scaling: float,
                       block: int | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulated attention of a block of queries on every slot, per KV head (torch version, the specification).

    For every real query and query head: the causal softmax of ``scaling * q.k`` over the real slots whose
    logical column is at most the query's. The result is the **sum** of those probabilities over the queries and
    over the ``G`` query heads of each KV head (the total attention mass that KV head's token received).

    Args:
        queries: ``[B, H, q, D]``; keys: ``[B, Hkv, L, D]``.
        key_pos: ``[B, Hkv, L]`` long logical columns; key_valid: ``[B, Hkv, L]`` bool.
        query_pos: ``[q]`` long logical columns of the queries.
        query_valid: ``[B, q]`` bool or ``None``.
        scaling: softmax scale.
        block: queries per step (bounds the ``[B, H, block, L]`` temporary); ``None``: up to 256, fewer where
            ``L`` is long, so that the temporary stays under :data:`MASS_BLOCK_ELEMENTS` elements.
        lse: optional ``[B, H, q]`` float, natural log: each query's log-sum-exp of ``scaling * q.k`` over its
            allowed keys (what the prefill attention computed); the probabilities are then ``exp(s - lse)``.
            Entries of invalid queries are never used (they may be anything, NaN included).

    Returns:
        ``[B, Hkv, L]`` in float32 (float64 for float64 inputs).
    """
    B, H, q, D = queries.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    G = H // Hkv
    if block is None:
        block = max(1, min(256, MASS_BLOCK_ELEMENTS // max(1, B * H * L)))
    dtype = torch.promote_types(queries.dtype, torch.float32)
    k = keys.to(dtype)
    mass = torch.zeros(B, Hkv, L, dtype=dtype, device=keys.device)
    for start in range(0, q, block):
        end = min(q, start + block)
        qb = queries[:, :, start:end].to(dtype).reshape(B, Hkv, G, end - start, D)
        logits = torch.einsum("bkgqd,bkld->bkgql", qb, k) * scaling             # [B, Hkv, G, q', L]
        allowed = key_valid.unsqueeze(2) & (key_pos.unsqueeze(2) <= query_pos[start:end].view(1, 1, -1, 1))
        logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        if lse is None:
            probs = attention_probabilities(logits)
        else:
            probs = attention_probabilities(logits, lse[:, :, start:end].view(B, Hkv, G, end - start))
        if query_valid is not None:
            probs = torch.where(query_valid[:, start:end].view(B, 1, 1, -1, 1), probs, 0.0)
        mass += probs.sum(dim=(2, 3))
    return mass


if HAS_TRITON:

    @triton.jit
    def _key_tile(kp_base, kv_base, offs, inr, skp_l, skv_l):
        """Logical positions ``kp``, validity ``ok`` and the smallest valid position ``kmin`` of a key tile."""
        kp = tl.load(kp_base + offs * skp_l, mask=inr, other=0)
        ok = inr & (tl.load(kv_base + offs * skv_l, mask=inr, other=0) != 0)
        return kp, ok, tl.min(tl.where(ok, kp, 9223372036854775807), 0)

    @triton.jit
    def _load_keys(k_base, slot_row, offs, ok, d, dm, sk_l, sk_d, sst_l, HAS_SLOTS: tl.constexpr,
                   DOT_F32: tl.constexpr):
        """The valid keys of a tile ``[BLOCK_N, BLOCK_D]`` (0 elsewhere), through the slot table if any."""
        at = offs.to(tl.int64)
        if HAS_SLOTS:                                       # key j lives at slot SLOT[b, j] of the pool
            at = tl.load(slot_row + offs * sst_l, mask=ok, other=0).to(tl.int64)
        kt = tl.load(k_base + at[:, None] * sk_l + d[None, :] * sk_d, mask=ok[:, None] & dm[None, :], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        return kt

    @triton.jit
    def _lse_kernel(
        Q, K, SLOT, KPOS, KVAL, QPOS, LSE, qk_scale, T, L, key_split, num_splits,
        sq_b, sq_h, sq_q, sq_d, sk_b, sk_h, sk_l, sk_d, sst_b, sst_l, skp_b, skp_h, skp_l, skv_b, skv_h, skv_l,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_SLOTS: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        # Pass 1 (only without the attention's lse): program (b * HKV + kvh, block of query rows t = query * G + g,
        # key split) -> LSE[b, kvh, t, split], the log2-sum-exp2 of scale * log2(e) * q.k over the allowed keys.
        # The G heads of a query are stacked as rows so that one key tile serves the whole group.
        pid = tl.program_id(0)
        b = (pid // HKV).to(tl.int64)
        kvh = (pid % HKV).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        kp_base = KPOS + b * skp_b + kvh * skp_h
        kv_base = KVAL + b * skv_b + kvh * skv_h
        t = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = t < T
        qpos = tl.load(QPOS + t // G, mask=rm, other=-1)
        qmax = tl.max(qpos, 0)
        qt = tl.load(Q + b * sq_b + (kvh * G + t % G)[:, None] * sq_h + (t // G)[:, None] * sq_q + d[None, :] * sq_d,
                     mask=rm[:, None] & dm[None, :], other=0.0)
        if DOT_F32:
            qt = qt.to(tl.float32)
        m = tl.full([BLOCK_R], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        start = tl.program_id(2) * key_split
        end = tl.minimum(start + key_split, L)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            kp, ok, kmin = _key_tile(kp_base, kv_base, offs, offs < end, skp_l, skv_l)
            if kmin <= qmax:                                # some row of the block sees some key of the tile
                kt = _load_keys(K + b * sk_b + kvh * sk_h, SLOT + b * sst_b, offs, ok, d, dm, sk_l, sk_d, sst_l,
                                HAS_SLOTS, DOT_F32)
                s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * qk_scale
                s = tl.where(ok[None, :] & (kp[None, :] <= qpos[:, None]), s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
                m = m_new
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(LSE + ((b * HKV + kvh) * T + t) * num_splits + tl.program_id(2), lse, mask=rm)

    @triton.jit
    def _mass_kernel(
        Q, K, SLOT, KPOS, KVAL, QMAX, QPOS, QVAL, LSE, OUT, qk_scale, lse_scale, NQ, L, row_split,
        sq_b, sq_h, sq_q, sq_d, sk_b, sk_h, sk_l, sk_d, sst_b, sst_l, skp_b, skp_h, skp_l, skv_b, skv_h, skv_l,
        sqv_b, sqv_q, sl_b, sl_k, sl_g, sl_q,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_QV: tl.constexpr, HAS_SLOTS: tl.constexpr, DOT_F32: tl.constexpr,
        PREC: tl.constexpr,
    ):
        # Pass 2: program (b * HKV + kvh, key block, query split) -> OUT[split, b, kvh, key] = sum over the split's
        # valid queries and the group's G heads of exp2(scale * log2(e) * q.k - lse), lse = LSE[b, kvh, g, query] *
        # lse_scale (log2). The key tile stays in registers/shared memory; the loop streams [BLOCK_M, D] tiles of
        # ONE head's consecutive queries (plain 2D loads), G heads per query block, and has no branch, so Triton can
        # pipeline its loads (num_stages). Invalid or out-of-range queries read as zeros with lse +inf (p = 0);
        # invalid keys' columns are dropped at the store; the only per-element mask is the causal one (int32).
        pid = tl.program_id(0)
        b = (pid // HKV).to(tl.int64)
        kvh = (pid % HKV).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inr = offs < L
        kp, ok, kmin = _key_tile(KPOS + b * skp_b + kvh * skp_h, KVAL + b * skv_b + kvh * skv_h, offs, inr, skp_l,
                                 skv_l)
        kt = _load_keys(K + b * sk_b + kvh * sk_h, SLOT + b * sst_b, offs, ok, d, dm, sk_l, sk_d, sst_l, HAS_SLOTS,
                        DOT_F32)
        kp = kp.to(tl.int32)
        # the split's queries [lo, end), from the first that may see a key of the tile: QMAX (the running max of the
        # query positions) is sorted, and no query before the first QMAX >= kmin sees any valid key of the tile
        lo = tl.program_id(2) * row_split
        end = tl.minimum(lo + row_split, NQ)
        hi = end
        while lo < hi:
            mid = (lo + hi) // 2
            seen = tl.load(QMAX + mid) >= kmin
            hi = tl.where(seen, mid, hi)
            lo = tl.where(seen, lo, mid + 1)
        q_base = Q + b * sq_b + kvh * G * sq_h
        lse_base = LSE + b * sl_b + kvh * sl_k
        rows = tl.arange(0, BLOCK_M)
        # per-element partial sums, reduced over the rows once at the end: a row reduction per tile would cross
        # warps (the dot's rows are spread over them) through shared memory at every step
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for it in range(0, tl.cdiv(end - lo, BLOCK_M) * G):    # query block it // G, head it % G of the group
            g = it % G
            qi = lo + (it // G) * BLOCK_M + rows
            rm = qi < end
            if HAS_QV:
                rm = rm & (tl.load(QVAL + b * sqv_b + qi * sqv_q, mask=rm, other=0) != 0)
            qpos = tl.load(QPOS + qi, mask=rm, other=0).to(tl.int32)
            qt = tl.load(q_base + g * sq_h + qi.to(tl.int64)[:, None] * sq_q + d[None, :] * sq_d,
                         mask=rm[:, None] & dm[None, :], other=0.0)              # int64: q * H * D may pass 2**31
            if DOT_F32:
                qt = qt.to(tl.float32)
            lse = tl.load(lse_base + g * sl_g + qi * sl_q, mask=rm, other=float("inf")) * lse_scale
            lse = tl.where(rm & (lse > float("-inf")), lse, float("inf"))   # NaN / no allowed key: p = 0
            s = tl.dot(qt, tl.trans(kt), input_precision=PREC)
            acc += tl.where(kp[None, :] <= qpos[:, None], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        tl.store(OUT + (tl.program_id(2) * tl.num_programs(0) + pid).to(tl.int64) * L + offs,
                 tl.where(ok, tl.sum(acc, 0), 0.0), mask=inr)
else:  # pragma: no cover - exercised only without triton
    _mass_kernel = _lse_kernel = _key_tile = _load_keys = None


def _check_mass_inputs(queries, keys, key_pos, key_valid, query_pos, query_valid, slots, lse=None):
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"queries must be [B, H, q, D] and keys [B, Hkv, L, D], got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    B, H, q, D = queries.shape
    Hkv = keys.shape[1]
    if keys.shape[0] != B or keys.shape[3] != D or H % Hkv:
        raise ValueError(f"shape mismatch: queries {tuple(queries.shape)}, keys {tuple(keys.shape)} "
                         "(need the same B and D, and H a multiple of Hkv)")
    if slots is not None and (slots.dim() != 2 or slots.shape[0] != B or slots.is_floating_point()):
        raise ValueError(f"slots must be a [B={B}, L] integer slot table, got {tuple(slots.shape)} {slots.dtype}")
    L = slots.shape[1] if slots is not None else keys.shape[2]
    for name, t in (("key_pos", key_pos), ("key_valid", key_valid)):
        if tuple(t.shape) != (B, Hkv, L):
            raise ValueError(f"{name} must be [B, Hkv, L] = {(B, Hkv, L)}, got {tuple(t.shape)}")
    if tuple(query_pos.shape) != (q,):
        raise ValueError(f"query_pos must be [q] = ({q},), got {tuple(query_pos.shape)}")
    if query_valid is not None and tuple(query_valid.shape) != (B, q):
        raise ValueError(f"query_valid must be [B, q] = {(B, q)} or None, got {tuple(query_valid.shape)}")
    if lse is not None and tuple(lse.shape) != (B, H, q):
        raise ValueError(f"lse must be [B, H, q] = {(B, H, q)} (each query's log-sum-exp) or None, got "
                         f"{tuple(lse.shape)}")
    return B, H, q, D, Hkv, L


def mass_runs_triton(backend: str, queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether :func:`attention_mass` runs the Triton kernel: :func:`~.dispatch.use_triton`'s rule, except that
    ``"auto"`` takes the torch reference for fp32 keys (an explicit ``"triton"`` is kept). The kernel's fp32 dots
    are exact ("ieee", :func:`dot_config`: the scores pick tokens) and run on the CUDA cores, where the reference's
    blocked fp32 matmuls run in cuBLAS. On the H200 (run O, 2026-12-02, ``benchmarks/profile_eval_batch.py --method
    h2o --routes gather,paged --mass-backends auto,torch``, docs/bench/run_o_2026-12-02/call3_eval_batch_h2o.txt)
    the engine's fp32 prompt tok/s read 3,679 with the kernel against 13,989 with torch on the gather route, 5,987
    against 7,830 on the paged route. In fp16/bf16 the kernel stays the choice (``benchmarks/bench_h2o_mass.py``:
    one pass at ~3x the attention's time at 8K-128K, without the reference's ``[B, H, block, L]`` logits)."""
    fp32_auto = backend == "auto" and keys.dtype == torch.float32
    return use_triton("torch" if fp32_auto else backend, _mass_kernel, queries, keys)


def attention_mass(queries: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor,
                   query_pos: torch.Tensor, query_valid: torch.Tensor | None, scaling: float,
                   block: int | None = None, *, backend: str = "auto", slots: torch.Tensor | None = None,
                   key_split: int | None = None, row_split: int | None = None,
                   lse: torch.Tensor | None = None, config: MassConfig | tuple | None = None) -> torch.Tensor:
    """:func:`attention_mass_ref`'s result, by the Triton kernel where :func:`~.dispatch.use_triton` says.

    Args (beyond :func:`attention_mass_ref`'s, whose ``block`` only the torch path uses):
        queries, keys: any strides; fp16/bf16/fp32 for Triton (queries are cast to the keys' dtype).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; ``"auto"`` is Triton on CUDA for fp16/bf16 keys, the torch
            reference otherwise (:func:`mass_runs_triton`).
        slots: optional ``[B, L]`` int slot table: ``keys`` is then a slot pool ``[B, Hkv, S, D]`` (e.g. a
            ``[S, Hkv, D]`` pool viewed with stride 0 over rows) and key ``j`` of row ``b`` is read from slot
            ``slots[b, j]`` in place (the engine's prefill); ``key_pos``/``key_valid``/the result are indexed by
            ``j``. Invalid keys' slots are not read.
        key_split, row_split: keys per split of pass 1 and queries per split of pass 2; default picks them to fill
            the GPU (tests set them to exercise the merges).
        lse: optional ``[B, H, q]`` natural-log log-sum-exp of each query over its allowed keys, from the attention
            (as in :func:`attention_mass_ref`), any strides: pass 1 is skipped. It must be over the same keys as the
            mass's causal rule (valid, ``key_pos <= query_pos``), else the probabilities do not sum to one.
        config: pass 2's tiles, :class:`MassConfig` (or a 4-tuple); ``None`` entries take the defaults
            (:func:`mass_config`). For sweeps (``benchmarks/bench_h2o_mass.py --mass-block-rows ...``) and tests.

    Real positions (valid queries and keys) must be below ``2**31`` (pass 2 compares them in int32).

    Returns:
        ``[B, Hkv, L]`` float32 (float64 for float64 inputs, which take the torch path).
    """
    B, H, q, D, Hkv, L = _check_mass_inputs(queries, keys, key_pos, key_valid, query_pos, query_valid, slots, lse)
    cfg = mass_config(D, config)
    if not mass_runs_triton(backend, queries, keys):
        if slots is not None:                          # the reference reads a gathered copy
            idx = slots.long().clamp(0, keys.shape[2] - 1).view(B, 1, L, 1)
            keys = keys.gather(2, idx.expand(B, Hkv, L, D))
        return attention_mass_ref(queries, keys, key_pos, key_valid, query_pos, query_valid, scaling, block, lse)
    G, T, dev = H // Hkv, q * H // Hkv, keys.device
    out = torch.zeros(B, Hkv, L, dtype=torch.float32, device=dev)
    if B == 0 or L == 0 or q == 0:
        return out
    qk = queries if queries.dtype == keys.dtype else queries.to(keys.dtype)
    kpos = key_pos.to(device=dev, dtype=torch.int64)
    kval = key_valid.to(device=dev, dtype=torch.bool).view(torch.uint8)
    qpos = query_pos.to(device=dev, dtype=torch.int64).contiguous()
    qval = query_valid.to(device=dev, dtype=torch.bool).view(torch.uint8) if query_valid is not None else kval
    slot_table = slots.to(dev) if slots is not None else qpos
    dot_f32, prec = dot_config(_mass_kernel, keys.dtype)
    meta = dict(HKV=Hkv, G=G, D=D, BLOCK_D=max(16, next_pow2(D)), HAS_SLOTS=slots is not None, DOT_F32=dot_f32,
                PREC=prec)
    strides = (*qk.stride(), *keys.stride(), *(slot_table.stride() if slots is not None else (0, 0)),
               *kpos.stride(), *kval.stride())
    scale = float(scaling) * LOG2E

    if lse is not None:                                 # the attention's [B, H, q], natural log; head = kvh * G + g
        lse = lse.to(device=dev, dtype=torch.float32)
        lse_strides, lse_scale = (lse.stride(0), G * lse.stride(1), lse.stride(1), lse.stride(2)), LOG2E
    else:                                               # pass 1's [B, Hkv, T = q * G, 1], log2; row = query * G + g
        lse = _row_lse(qk, keys, slot_table, kpos, kval, qpos, scale, T, L, key_split, strides, meta)
        lse_strides, lse_scale = (Hkv * T, T, 1, G), 1.0

    key_blocks = -(-L // cfg.block_keys)
    row_split, rs, _ = plan_splits(q, B * Hkv * key_blocks, dev, row_split, max_block=cfg.block_rows)
    part = out if rs == 1 else torch.empty(rs, B, Hkv, L, dtype=torch.float32, device=dev)
    qmax = torch.cummax(qpos, 0).values                 # sorted: where each key tile's first viewer is searched
    _mass_kernel[(B * Hkv, key_blocks, rs)](
        qk, keys, slot_table, kpos, kval, qmax, qpos, qval, lse, part, scale, lse_scale, q, L, row_split, *strides,
        *(qval.stride() if query_valid is not None else (0, 0)), *lse_strides, HAS_QV=query_valid is not None,
        BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_keys, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)
    return out if rs == 1 else part.sum(0)


def _row_lse(qk, keys, slot_table, kpos, kval, qpos, scale, T, L, key_split, strides, meta):
    """Pass 1 of :func:`attention_mass`: ``[B, Hkv, T, 1]`` log2-sum-exp2 of every query row (split-K merged)."""
    B, Hkv = keys.shape[0], meta["HKV"]
    dev = keys.device
    row_blocks = -(-T // LSE_BLOCK_ROWS)
    key_split, ks, _ = plan_splits(L, B * Hkv * row_blocks, dev, key_split, max_block=LSE_BLOCK_KEYS)
    lse = torch.empty(B, Hkv, T, ks, dtype=torch.float32, device=dev)
    _lse_kernel[(B * Hkv, row_blocks, ks)](qk, keys, slot_table, kpos, kval, qpos, lse, scale, T, L, key_split, ks,
                                           *strides, BLOCK_R=LSE_BLOCK_ROWS, BLOCK_N=LSE_BLOCK_KEYS,
                                           num_warps=8 if meta["D"] >= 128 else 4, **meta)
    if ks > 1:                                          # merge the key splits' log2-sum-exp2
        m = lse.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse = m + torch.log2(torch.exp2(lse - m).sum(-1, keepdim=True))
    return lse.contiguous()                             # [B, Hkv, T, 1]
