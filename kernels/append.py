"""Writing new K/V into preallocated caches, in one launch and with no host-side slot index.

- :func:`append_kv` -- the HF path: one decode token per row, written at a device-side per-layer slot counter
  (every row advances together). Replaces three ``index_copy_`` launches per layer and step (K, V, position);
  with the counter add that follows, a decode step writes its cache in two kernels (CUDA-graph safe).
- :func:`store_kv_slots` -- the engine path: ``T`` tokens of any rows, each written to its own slot of a
  token-slot pool through a per-token ``slot_mapping`` (``-1`` skips), so every row advances alone.

Torch versions: :func:`~sparse_hf.kernels.reference.append_kv_ref`, :func:`~sparse_hf.kernels.reference.store_kv_slots_ref`.
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, use_triton
from .reference import append_kv_ref, store_kv_slots_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _append_kernel(K, V, POS, CNT, KN, VN,
                       sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sp_b, sp_h, sp_l,
                       skn_b, skn_h, svn_b, svn_h,
                       HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // HKV).to(tl.int64)
        h = (pid % HKV).to(tl.int64)
        slot = tl.load(CNT).to(tl.int64)
        seen = tl.load(CNT + 1)
        d = tl.arange(0, BLOCK_D)
        kv = tl.load(KN + b * skn_b + h * skn_h + d, mask=d < D)
        tl.store(K + b * sk_b + h * sk_h + slot * sk_l + d, kv, mask=d < D)
        vv = tl.load(VN + b * svn_b + h * svn_h + d, mask=d < DV)
        tl.store(V + b * sv_b + h * sv_h + slot * sv_l + d, vv, mask=d < DV)
        tl.store(POS + b * sp_b + h * sp_h + slot * sp_l, seen)

    @triton.jit
    def _store_slots_kernel(KP, VP, PP, KN, VN, SLOT, TPOS,
                            skp_s, skp_h, svp_s, svp_h, spp_s, spp_h, skn_t, skn_h, svn_t, svn_h,
                            HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HAS_POS: tl.constexpr):
        # One program per new token: all its KV heads at once ([BLOCK_H, BLOCK_D] tiles, last dim contiguous).
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(SLOT + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        hm = (h < HKV) & ((tl.zeros([BLOCK_H], tl.int64) + slot) >= 0)      # slot -1: nothing is written
        km = hm[:, None] & (d[None, :] < D)
        kv = tl.load(KN + t * skn_t + h[:, None] * skn_h + d[None, :], mask=km)
        tl.store(KP + slot * skp_s + h[:, None] * skp_h + d[None, :], kv, mask=km)
        vm = hm[:, None] & (d[None, :] < DV)
        vv = tl.load(VN + t * svn_t + h[:, None] * svn_h + d[None, :], mask=vm)
        tl.store(VP + slot * svp_s + h[:, None] * svp_h + d[None, :], vv, mask=vm)
        if HAS_POS:
            pos = tl.load(TPOS + t)
            tl.store(PP + slot * spp_s + h * spp_h, tl.zeros([BLOCK_H], tl.int64) + pos, mask=hm)
else:  # pragma: no cover
    _append_kernel = None
    _store_slots_kernel = None


def append_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, pos_buf: torch.Tensor, counters: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, backend: str = "auto") -> None:
    """Write ``key``/``value`` ``[B, Hkv, 1, D]`` at slot ``counters[0]`` of ``k_buf``/``v_buf``
    (``[B, Hkv, capacity, D]``, last dim contiguous) and ``counters[1]`` at that slot of ``pos_buf``
    (``[B, Hkv, capacity]``); then advance both counters by one. ``counters``: ``[2]`` long on the device."""
    B, Hkv = key.shape[:2]
    if not use_triton(backend, _append_kernel, key, value) or k_buf.stride(-1) != 1 or v_buf.stride(-1) != 1:
        append_kv_ref(k_buf, v_buf, pos_buf, counters, key, value)
    else:
        key, value = key.contiguous(), value.contiguous()
        D, Dv = key.shape[-1], value.shape[-1]
        _append_kernel[(B * Hkv,)](
            k_buf, v_buf, pos_buf, counters, key, value,
            k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
            pos_buf.stride(0), pos_buf.stride(1), pos_buf.stride(2),
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            HKV=Hkv, D=D, DV=Dv, BLOCK_D=triton.next_power_of_2(max(D, Dv)))
    counters += 1


def store_kv_slots(k_pool: torch.Tensor, v_pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor, pos_pool: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None, backend: str = "auto") -> None:
    """Write ``T`` new tokens into a token-slot pool, each at its own slot (one launch, no host sync).

    Args:
        k_pool, v_pool: ``[num_slots, Hkv, D]`` / ``[num_slots, Hkv, Dv]`` one layer's pool, last dim contiguous
            (a view ``pool[0, layer]`` of a ``[2, layers, num_slots, Hkv, D]`` pool is fine).
        key, value: ``[T, Hkv, D]`` / ``[T, Hkv, Dv]`` the new tokens (any rows, flattened), pool dtype.
        slot_mapping: ``[T]`` int32/int64 on the device: token ``t`` goes to slot ``slot_mapping[t]``; ``-1`` skips it
            (padding, or a token the method does not keep). Slots of one call must be distinct.
        pos_pool: optional ``[num_slots]`` or ``[num_slots, Hkv]`` int, the logical position table of the pool.
        positions: ``[T]`` int, each token's logical position (needed with ``pos_pool``), written to its slot
            (to every head's entry of a ``[num_slots, Hkv]`` table).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :func:`sparse_hf.kernels.dispatch.use_triton`).
    """
    T, Hkv, D = key.shape
    Dv = value.shape[-1]
    if (value.shape[:2] != (T, Hkv) or slot_mapping.shape != (T,) or k_pool.shape[1:] != (Hkv, D)
            or v_pool.shape[1:] != (Hkv, Dv)):
        raise ValueError(f"store_kv_slots: key {tuple(key.shape)} / value {tuple(value.shape)} must be [T, Hkv, D] "
                         f"matching the pools {tuple(k_pool.shape)} / {tuple(v_pool.shape)}, and slot_mapping "
                         f"{tuple(slot_mapping.shape)} must be [T]")
    if (pos_pool is None) != (positions is None):
        raise ValueError("store_kv_slots: pass pos_pool and positions together (or neither)")
    if positions is not None and positions.shape != (T,):
        raise ValueError(f"store_kv_slots: positions {tuple(positions.shape)} must be [T] = [{T}]")
    if T == 0:
        return
    fast = (use_triton(backend, _store_slots_kernel, key, value, k_pool, v_pool)
            and k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1)
    if not fast:
        store_kv_slots_ref(k_pool, v_pool, key, value, slot_mapping, pos_pool, positions)
        return
    key, value = key.to(k_pool.dtype), value.to(v_pool.dtype)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    has_pos = pos_pool is not None
    pp = pos_pool if has_pos else slot_mapping
    pstride = (pp.stride(0), pp.stride(1) if pp.dim() == 2 else 0) if has_pos else (0, 0)
    _store_slots_kernel[(T,)](
        k_pool, v_pool, pp, key, value, slot_mapping, positions if has_pos else slot_mapping,
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), *pstride,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        HKV=Hkv, D=D, DV=Dv, BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(max(D, Dv)),
        HAS_POS=has_pos)
