"""Copy the K and V of a list of pool slots into a step buffer, in one launch.

An engine DeltaKV compressed layer attends to each row's raw sinks + buffer beside its rebuilt tokens, both in
one step buffer; the raw part is a gather of ``B * W`` pool slots, for K and for V. In torch that is two
``index_select`` launches per layer (42 per step of the 7B shape); :func:`gather_kv_slots` does both in one.
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_kv_slots_kernel(SLOTS, K, V, KO, VO, sk_s, sv_s, sko_n, svo_n,
                                KW: tl.constexpr, VW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        s = tl.load(SLOTS + i).to(tl.int64)
        e = tl.arange(0, BLOCK_K)
        tl.store(KO + i * sko_n + e, tl.load(K + s * sk_s + e, mask=e < KW), mask=e < KW)
        f = tl.arange(0, BLOCK_V)
        tl.store(VO + i * svo_n + f, tl.load(V + s * sv_s + f, mask=f < VW), mask=f < VW)
else:  # pragma: no cover - exercised only without triton
    _gather_kv_slots_kernel = None


def gather_kv_slots(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k_out: torch.Tensor,
                    v_out: torch.Tensor, backend: str = "auto") -> None:
    """``k_out[i] = k_pool[slots[i]]`` and ``v_out[i] = v_pool[slots[i]]``.

    Args:
        k_pool, v_pool: ``[S, Hkv, D]`` / ``[S, Hkv, Dv]`` slot pools (each slot's heads contiguous).
        slots: ``[n]`` int slot ids in ``[0, S)``.
        k_out, v_out: ``[n, Hkv, D]`` / ``[n, Hkv, Dv]`` contiguous, written in place.
    """
    n = slots.shape[0]
    if k_out.shape != (n, *k_pool.shape[1:]) or v_out.shape != (n, *v_pool.shape[1:]):
        raise ValueError(f"outputs {tuple(k_out.shape)} / {tuple(v_out.shape)} do not fit {n} slots of pools "
                         f"{tuple(k_pool.shape)} / {tuple(v_pool.shape)}")
    if not use_triton(backend, _gather_kv_slots_kernel, k_pool, v_pool):
        torch.index_select(k_pool, 0, slots, out=k_out)
        torch.index_select(v_pool, 0, slots, out=v_out)
        return
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("k_out", k_out), ("v_out", v_out)):
        if t.shape[0] and not t[0].is_contiguous():
            raise ValueError(f"{name}: each slot's [Hkv, D] must be contiguous (strides {t.stride()})")
    if n == 0:
        return
    kw, vw = k_pool[0].numel(), v_pool[0].numel()
    _gather_kv_slots_kernel[(n,)](slots, k_pool, v_pool, k_out, v_out, k_pool.stride(0), v_pool.stride(0),
                                  k_out.stride(0), v_out.stride(0), KW=kw, VW=vw, BLOCK_K=next_pow2(kw),
                                  BLOCK_V=next_pow2(vw), num_warps=4)
