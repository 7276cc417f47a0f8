"""DeltaKV rebuild in one Triton kernel for a linear ``up``: gather + dequantise, ``up`` GEMM, fathers' mean, k_norm,
RoPE and the store into the scratch slots, without the ``[B, k, r]`` latents and ``[B, k, Dx]`` ``up`` output in
memory.

The two-kernel path (:func:`~sparse_hf.kernels.deltakv_rebuild.deltakv_rebuild_kv`) writes the dequantised latents,
runs ``up`` as one cuBLAS GEMM that writes ``[B*k, Dx]``, then reads that back in the writeback kernel: at 13,039
picks per layer (a 0.1 budget at 128K) and ``Dx = 1024`` in bf16 that is ~66 MB of round trip per compressed layer
per step (21 layers: ~1.4 GB) and three launches. Here one program owns ``BLOCK_M`` picks of one row and one KV head:
it dequantises their latents into a ``[BLOCK_M, r]`` tile, multiplies it by the head's columns of ``W_up`` (the K
columns as two rotate-half tiles, the V columns as a third; ``W_up`` is re-read per tile from L2, ``r * Dx`` = 512 KB
in bf16), and finishes as the writeback kernel does. The rounding follows the two-kernel path: latents rounded to
``up``'s dtype, ``z @ W.T + b`` accumulated in float32 and rounded once to ``up``'s dtype, then the rest in float32.
Only the GEMM's summation order differs, so results agree to that dtype's rounding.

Entry point: :func:`deltakv_rebuild_fused`; a torch statement of the same math is the two-kernel path's reference
(``deltakv_gather_latents_ref`` + ``F.linear`` + ``deltakv_writeback_ref``), which the tests compare against.
"""

from __future__ import annotations

import torch

from .deltakv_rebuild import group_width
from .dispatch import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .deltakv_rebuild import _latent_row, _latent_tile, _pick_tile

    @triton.jit
    def _tile_x(z, W, BIAS, CX, FATH, b, row, cidx, is_center, jm, cols, cm,
                sw_o, sw_i, scx_b, scx_m, sf_b, sf_n,
                R: tl.constexpr, BLOCK_R: tl.constexpr, NBR: tl.constexpr, HAS_BIAS: tl.constexpr,
                IEEE: tl.constexpr):
        """``x[:, cols]`` of the tile's picks (fp32 ``[BLOCK_M, BLOCK_C]``): the center as stored, else
        ``round(z @ W[cols].T + b) + mean(fathers)``."""
        i = tl.arange(0, BLOCK_R)
        w = tl.load(W + cols[None, :] * sw_o + i[:, None] * sw_i, mask=cm[None, :] & (i < R)[:, None], other=0.0)
        if IEEE:                                       # float32 weights: no TF32 (cuBLAS's float32 default)
            up = tl.dot(z, w, input_precision="ieee", out_dtype=tl.float32)        # [BLOCK_M, BLOCK_C]
        else:
            up = tl.dot(z, w, out_dtype=tl.float32)
        if HAS_BIAS:
            up += tl.load(BIAS + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        up = up.to(W.dtype.element_ty).to(tl.float32)                              # as up's output dtype
        m2 = jm[:, None] & cm[None, :]
        acc = up * 0.0
        cnt = tl.sum(acc, 1) * 0.0                                                 # [BLOCK_M]
        for f in tl.static_range(NBR):
            fid = tl.load(FATH + b * sf_b + row * sf_n + f, mask=jm, other=-1).to(tl.int64)
            ok = fid >= 0
            acc += tl.load(CX + b * scx_b + tl.maximum(fid, 0)[:, None] * scx_m + cols[None, :],
                           mask=m2 & ok[:, None], other=0.0).to(tl.float32)
            cnt += ok.to(tl.float32)
        xc = tl.load(CX + b * scx_b + cidx[:, None] * scx_m + cols[None, :], mask=m2 & is_center[:, None],
                     other=0.0).to(tl.float32)
        return tl.where(is_center[:, None], xc, up + acc / tl.maximum(cnt, 1.0)[:, None])

    @triton.jit
    def _fused_rebuild_kernel(PICK, CODES, SCALE, OFFSET, FATH, CX, W, BIAS, COS, SIN, KW, KOUT, VOUT,
                              k, step, num_sink, n_centers, n_lat, eps,
                              sp_b, sp_k, sc_b, sc_n, ss_b, ss_n, so_b, so_n, sf_b, sf_n, scx_b, scx_m, sw_o, sw_i,
                              scos_b, scos_k, ssin_b, ssin_k, sko_b, sko_h, sko_k, svo_b, svo_h, svo_k,
                              HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
                              GW: tl.constexpr, MODE: tl.constexpr, NBR: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_R: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_KNORM: tl.constexpr, IEEE: tl.constexpr):
        # one program per (row, tile of BLOCK_M picks) x KV head
        b, j, jm, p = _pick_tile(PICK, k, sp_b, sp_k, BLOCK_M)
        h = tl.program_id(1).to(tl.int64)
        pc = tl.maximum(p, 0)
        is_center = (pc % step) == 0
        cidx = tl.minimum(num_sink + pc // step, n_centers - 1)
        row = _latent_row(p, step, n_lat)
        z = _latent_tile(CODES, SCALE, OFFSET, b, row, jm, sc_b, sc_n, ss_b, ss_n, so_b, so_n,
                         R, GW, MODE, BLOCK_R).to(W.dtype.element_ty)                 # as up's input dtype
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, HALF_BLOCK)
        dm = d < HALF
        lo = _tile_x(z, W, BIAS, CX, FATH, b, row, cidx, is_center, jm, h * D + d, dm,
                     sw_o, sw_i, scx_b, scx_m, sf_b, sf_n, R, BLOCK_R, NBR, HAS_BIAS, IEEE)
        hi = _tile_x(z, W, BIAS, CX, FATH, b, row, cidx, is_center, jm, h * D + HALF + d, dm,
                     sw_o, sw_i, scx_b, scx_m, sf_b, sf_n, R, BLOCK_R, NBR, HAS_BIAS, IEEE)
        if HAS_KNORM:
            inv = 1.0 / tl.sqrt((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / D + eps)           # [BLOCK_M]
            lo = lo * inv[:, None] * tl.load(KW + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            hi = hi * inv[:, None] * tl.load(KW + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        km = jm[:, None] & dm[None, :]
        cb = COS + b * scos_b + j[:, None] * scos_k + d[None, :]
        sb = SIN + b * ssin_b + j[:, None] * ssin_k + d[None, :]
        c_lo = tl.load(cb, mask=km, other=0.0).to(tl.float32)
        c_hi = tl.load(cb + HALF, mask=km, other=0.0).to(tl.float32)
        s_lo = tl.load(sb, mask=km, other=0.0).to(tl.float32)
        s_hi = tl.load(sb + HALF, mask=km, other=0.0).to(tl.float32)
        kb = KOUT + b * sko_b + h * sko_h + j[:, None] * sko_k + d[None, :]
        tl.store(kb, (lo * c_lo - hi * s_lo).to(KOUT.dtype.element_ty), mask=km)
        tl.store(kb + HALF, (hi * c_hi + lo * s_hi).to(KOUT.dtype.element_ty), mask=km)
        e = tl.arange(0, BLOCK_DV)
        em = e < DV
        v = _tile_x(z, W, BIAS, CX, FATH, b, row, cidx, is_center, jm, HKV * D + h * DV + e, em,
                    sw_o, sw_i, scx_b, scx_m, sf_b, sf_n, R, BLOCK_R, NBR, HAS_BIAS, IEEE)
        tl.store(VOUT + b * svo_b + h * svo_h + j[:, None] * svo_k + e[None, :], v.to(VOUT.dtype.element_ty),
                 mask=jm[:, None] & em[None, :])
else:  # pragma: no cover - exercised only without triton
    _fused_rebuild_kernel = None


def fused_rebuild_runs(backend: str, center_x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether :func:`deltakv_rebuild_fused` runs its kernel for these tensors and ``backend`` (a linear ``up``)."""
    return weight is not None and use_triton(backend, _fused_rebuild_kernel, center_x, weight)


def deltakv_rebuild_fused(pick: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None,
                          offset: torch.Tensor | None, fathers: torch.Tensor, center_x: torch.Tensor,
                          weight: torch.Tensor, bias: torch.Tensor | None, step: int, num_sink: int,
                          cos: torch.Tensor, sin: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                          k_norm_weight: torch.Tensor | None = None, k_norm_eps: float = 1e-6,
                          block_m: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The picks of :func:`~sparse_hf.kernels.deltakv_rebuild.deltakv_rebuild_kv` rebuilt in one launch, for a
    linear ``up`` given as ``weight [Dx, r]`` (``nn.Linear`` layout) and ``bias [Dx]`` (or ``None``). Same arguments
    otherwise; ``codes`` must hold at least one latent row. Triton only (see :func:`fused_rebuild_runs`)."""
    B, k = pick.shape
    _, Hkv, _, D = k_out.shape
    Dv = v_out.shape[-1]
    mode = 0 if scale is None else (8 if offset is None else 4)
    r = codes.shape[-1] * (2 if mode == 4 else 1)
    if weight.shape != (center_x.shape[-1], r) or center_x.shape[-1] != Hkv * (D + Dv) or D % 2:
        raise ValueError(f"deltakv_rebuild_fused: up weight {tuple(weight.shape)} is not [Hkv*(D+Dv), r] = "
                         f"[{Hkv * (D + Dv)}, {r}], or center_x width {center_x.shape[-1]} does not match, or D odd")
    for name, t in dict(codes=codes, scale=scale, offset=offset, center_x=center_x, cos=cos, sin=sin,
                        k_out=k_out, v_out=v_out).items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (got strides {t.stride()})")
    if B * k == 0:
        return k_out, v_out
    grid = (B * triton.cdiv(k, block_m), Hkv)
    _fused_rebuild_kernel[grid](
        pick, codes, scale if scale is not None else codes, offset if offset is not None else codes, fathers,
        center_x, weight, bias if bias is not None else weight, cos, sin,
        k_norm_weight if k_norm_weight is not None else cos, k_out, v_out,
        k, step, num_sink, center_x.shape[1], fathers.shape[1], float(k_norm_eps),
        pick.stride(0), pick.stride(1), codes.stride(0), codes.stride(1),
        *(scale.stride()[:2] if scale is not None else (0, 0)), *(offset.stride()[:2] if offset is not None else (0, 0)),
        fathers.stride(0), fathers.stride(1), center_x.stride(0), center_x.stride(1), weight.stride(0),
        weight.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        k_out.stride(0), k_out.stride(1), k_out.stride(2), v_out.stride(0), v_out.stride(1), v_out.stride(2),
        HKV=Hkv, D=D, DV=Dv, R=r, GW=group_width(r, scale, mode), MODE=mode, NBR=fathers.shape[-1],
        BLOCK_M=block_m, BLOCK_R=max(16, next_pow2(r)), HALF_BLOCK=max(16, next_pow2(D // 2)),
        BLOCK_DV=max(16, next_pow2(Dv)), HAS_BIAS=bias is not None, HAS_KNORM=k_norm_weight is not None,
        IEEE=weight.dtype == torch.float32, num_warps=4)
    return k_out, v_out
