"""The two index steps around a DeltaKV decode step's top-k, one launch each (the HF path runs them once per
observation layer and step; each replaces several small torch ops and the per-layer ``[B, N]`` column tables the
torch version needs: 17 bytes per compressed token per layer, ~0.6% of a full cache at 128K):

- :func:`deltakv_pick_scores` -- the observer's column scores gathered into compressed-offset order
  (:func:`~sparse_hf.kernels.reference.deltakv_pick_scores_ref`);
- :func:`deltakv_pick_columns` -- the picks' logical columns and RoPE positions
  (:func:`~sparse_hf.kernels.reference.deltakv_pick_columns_ref`).

No host sync, static shapes: CUDA-graph safe.
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, use_triton
from .reference import deltakv_pick_columns_ref, deltakv_pick_scores_ref

_BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pick_scores_kernel(S, CP, OFF, OUT, N, ss_b, scp_b, so_b, sout_b, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < N
        p = tl.load(CP + b * scp_b + j, mask=m, other=-1).to(tl.int64)
        off = tl.load(OFF + b * so_b).to(tl.int64)
        ok = m & (p >= 0)
        s = tl.load(S + b * ss_b + tl.where(ok, p + off, 0), mask=ok, other=float("-inf"))
        tl.store(OUT + b * sout_b + j, s, mask=m)

    @triton.jit
    def _pick_columns_kernel(PICK, KEEP, CP, OFF, COLS, POS, k, sp_b, sk_b, scp_b, so_b, sc_b, spo_b,
                             BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < k
        pick = tl.maximum(tl.load(PICK + b * sp_b + j, mask=m, other=0).to(tl.int64), 0)
        keep = tl.load(KEEP + b * sk_b + j, mask=m, other=0) != 0
        pos = tl.load(CP + b * scp_b + pick, mask=m, other=-1).to(tl.int64)
        off = tl.load(OFF + b * so_b).to(tl.int64)
        tl.store(COLS + b * sc_b + j, tl.where(keep & (pos >= 0), pos + off, -1), mask=m)
        tl.store(POS + b * spo_b + j, pos, mask=m)
else:  # pragma: no cover - exercised only without triton
    _pick_scores_kernel = _pick_columns_kernel = None


def _check(**tensors):
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (got strides {t.stride()})")


def deltakv_pick_scores(scores: torch.Tensor, comp_pos: torch.Tensor, offset: torch.Tensor,
                        backend: str = "auto") -> torch.Tensor:
    """``[B, N]`` float32 scores of the compressed tokens in offset order (see :func:`deltakv_pick_scores_ref`)."""
    if not use_triton(backend, _pick_scores_kernel if HAS_TRITON else None, scores):
        return deltakv_pick_scores_ref(scores, comp_pos, offset)
    B, N = comp_pos.shape
    _check(scores=scores, comp_pos=comp_pos)
    out = torch.empty(B, N, dtype=scores.dtype, device=scores.device)
    if B * N:
        _pick_scores_kernel[(B, triton.cdiv(N, _BLOCK))](scores, comp_pos, offset, out, N, scores.stride(0),
                                                         comp_pos.stride(0), offset.stride(0), out.stride(0),
                                                         BLOCK=_BLOCK)
    return out


def deltakv_pick_columns(pick: torch.Tensor, keep: torch.Tensor, comp_pos: torch.Tensor, offset: torch.Tensor,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(cols, pos)`` of the picks (see :func:`deltakv_pick_columns_ref`)."""
    if not use_triton(backend, _pick_columns_kernel if HAS_TRITON else None, pick):
        return deltakv_pick_columns_ref(pick, keep, comp_pos, offset)
    B, k = pick.shape
    _check(pick=pick, keep=keep, comp_pos=comp_pos)
    cols = torch.empty(B, k, dtype=torch.long, device=pick.device)
    pos = torch.empty_like(cols)
    if B * k:
        _pick_columns_kernel[(B, triton.cdiv(k, _BLOCK))](pick, keep, comp_pos, offset, cols, pos, k, pick.stride(0),
                                                          keep.stride(0), comp_pos.stride(0), offset.stride(0),
                                                          cols.stride(0), pos.stride(0), BLOCK=_BLOCK)
    return cols, pos
