"""H2O's steady-state decode eviction in one launch: per (layer, row, KV head) find the token to drop and move the
row's newest token into its slot.

Why: after every decode step each row over its budget holds exactly ``budget + 1`` tokens per layer and KV head and
drops one, the lowest-scored middle token (``H2O.decode_evict_one`` in ``sparse_hf/methods/h2o.py`` is the rule;
``ScoredKVPool.evict_one`` in ``sparse_hf/engine/scored_pool.py`` its torch path, about 50 small ops for every
layer at once). This kernel is that rule and move transcribed, one program per (layer, row, KV head) over the row's
slot table: the candidates are the live columns whose logical position is neither a sink (``< num_sink``) nor
recent (``> newest - num_recent``); the dropped one has the smallest int64 key (score's order-preserving float32
bits, then ``2**31 - 1 - position``: ties go to the latest token; ``-0.0 == +0.0``, NaN above ``inf``), exactly
``selection.lowest_candidate``'s key. Then the newest token (table column ``lens - 1``) moves into the dropped
token's slot for that head: its K, V, score and position. Programs touch distinct (slot, head) cells: no races.
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, next_pow2, tl, triton, use_triton

#: Table columns per loop iteration.
EVICT_BLOCK = 1024

if HAS_TRITON:

    @triton.jit
    def _evict_one_kernel(K, V, SC, POS, TAB, LENS, NEWEST, OVER, B, W, num_sink, num_recent,
                          sk_l, sk_s, sk_h, sv_l, sv_s, sv_h, ssc_l, ssc_s, ssc_h, sp_l, sp_s, sp_h,
                          st_l, st_b, sln_l, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        layer = (pid // (B * HKV)).to(tl.int64)
        b = (pid // HKV) % B
        h = (pid % HKV).to(tl.int64)
        if tl.load(OVER + b) != 0:
            n = tl.load(LENS + layer * sln_l + b).to(tl.int64)
            newest = tl.load(NEWEST + b).to(tl.int64)
            tab = TAB + layer * st_l + b * st_b
            sc_base = SC + layer * ssc_l + h * ssc_h
            pos_base = POS + layer * sp_l + h * sp_h
            best = tl.full([BLOCK], 9223372036854775807, tl.int64)
            best_col = tl.zeros([BLOCK], tl.int64)
            for c0 in range(0, W, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                live = cols < n
                slot = tl.load(tab + cols, mask=live, other=0).to(tl.int64)
                s = tl.load(sc_base + slot * ssc_s, mask=live, other=0.0)
                p = tl.load(pos_base + slot * sp_s, mask=live, other=0).to(tl.int64)
                s = tl.where(s == 0.0, 0.0, s)                                   # -0.0 ties +0.0
                bits = s.to(tl.int32, bitcast=True)
                bits = tl.where(s != s, 0x7FC00000, bits)                        # every NaN: one positive NaN
                ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
                key = ordered * 4294967296 + (2147483647 - p)
                cand = live & (p >= num_sink) & (p <= newest - num_recent)
                key = tl.where(cand, key, 9223372036854775807)
                better = key < best
                best = tl.where(better, key, best)
                best_col = tl.where(better, cols.to(tl.int64), best_col)
            kmin = tl.min(best, 0)
            col = tl.min(tl.where(best == kmin, best_col, 9223372036854775807), 0)
            if kmin != 9223372036854775807:                                      # a row with a middle token
                src = tl.load(tab + n - 1).to(tl.int64)
                dst = tl.load(tab + col).to(tl.int64)
                d = tl.arange(0, BLOCK_D)
                dm = d < D
                kv = tl.load(K + layer * sk_l + src * sk_s + h * sk_h + d, mask=dm)
                tl.store(K + layer * sk_l + dst * sk_s + h * sk_h + d, kv, mask=dm)
                vv = tl.load(V + layer * sv_l + src * sv_s + h * sv_h + d, mask=dm)
                tl.store(V + layer * sv_l + dst * sv_s + h * sv_h + d, vv, mask=dm)
                tl.store(sc_base + dst * ssc_s, tl.load(sc_base + src * ssc_s))
                tl.store(pos_base + dst * sp_s, tl.load(pos_base + src * sp_s))
else:  # pragma: no cover - exercised only without triton
    _evict_one_kernel = None


def evict_one_runs(backend: str, k_all: torch.Tensor) -> bool:
    """Whether :func:`evict_one_slots` runs (Triton for ``backend`` and tensors like ``k_all``); else the caller
    takes its torch path."""
    return use_triton(backend, _evict_one_kernel, k_all)


def evict_one_slots(k_all: torch.Tensor, v_all: torch.Tensor, scores: torch.Tensor, pos: torch.Tensor,
                    tables: torch.Tensor, lens: torch.Tensor, newest: torch.Tensor, over: torch.Tensor,
                    num_sink: int, num_recent: int) -> None:
    """In place: rows ``over`` drop one token per layer and KV head (see the module docstring).

    Args:
        k_all, v_all: ``[L, S, Hkv, D]`` slot pools (last dim contiguous); scores: ``[L, S, Hkv]`` float32;
            pos: ``[L, S, Hkv]`` int32 logical positions.
        tables: ``[L, B, W]`` int32 slot tables (last dim contiguous); lens: ``[L, B]`` slots per row, the newest
            token included (``<= W``); newest: ``[B]`` its positions; over: ``[B]`` bool rows to evict in.
        num_sink, num_recent: the method's protected counts.
    """
    L, B, W = tables.shape
    Hkv, D = k_all.shape[2], k_all.shape[3]
    if k_all.stride(-1) != 1 or v_all.stride(-1) != 1 or tables.stride(-1) != 1:
        raise ValueError("evict_one_slots needs K/V and the tables contiguous in their last dim")
    if L * B * Hkv == 0 or W == 0:
        return
    newest = newest.to(torch.int64).contiguous()
    over = over.to(torch.int8).contiguous()
    lens = lens.to(torch.int32)
    if lens.stride(1) != 1:
        lens = lens.contiguous()
    _evict_one_kernel[(L * B * Hkv,)](
        k_all, v_all, scores, pos, tables, lens, newest, over, B, W, int(num_sink), int(num_recent),
        *k_all.stride()[:3], *v_all.stride()[:3], *scores.stride(), *pos.stride(), tables.stride(0),
        tables.stride(1), lens.stride(0), HKV=Hkv, D=D, BLOCK_D=max(16, next_pow2(D)),
        BLOCK=min(EVICT_BLOCK, max(16, next_pow2(W))), num_warps=4)
