"""Append one decode token's K/V to a preallocated cache at a device-side slot counter (one launch).

Replaces three ``index_copy_`` launches per layer and step (K, V, position); with the counter add that
follows, a decode step writes its cache in two kernels, with no host-side slot index (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, use_triton

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
else:  # pragma: no cover
    _append_kernel = None


def append_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, pos_buf: torch.Tensor, counters: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, backend: str = "auto") -> None:
    """Write ``key``/``value`` ``[B, Hkv, 1, D]`` at slot ``counters[0]`` of ``k_buf``/``v_buf``
    (``[B, Hkv, capacity, D]``, last dim contiguous) and ``counters[1]`` at that slot of ``pos_buf``
    (``[B, Hkv, capacity]``); then advance both counters by one. ``counters``: ``[2]`` long on the device."""
    B, Hkv = key.shape[:2]
    if not use_triton(backend, _append_kernel, key, value) or k_buf.stride(-1) != 1 or v_buf.stride(-1) != 1:
        slot = counters[0:1]
        k_buf.index_copy_(2, slot, key)
        v_buf.index_copy_(2, slot, value)
        pos_buf.index_copy_(2, slot, counters[1:2].view(1, 1, 1).expand(B, Hkv, 1))
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
