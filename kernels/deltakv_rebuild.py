"""DeltaKV rebuild of picked compressed tokens into scratch K/V slots: two Triton kernels around ``up``.

A decode step of a DeltaKV layer reads, beside its raw slots, ``k`` compressed tokens per row (``pick [B, k]``,
the filter layer's top ones). Each is rebuilt as ``x = up(latent) + mean(fathers' raw x)`` (a center as stored),
then split into K and V, K RMS-normed (Qwen3's ``k_norm``) and rotated at the token's position, and written into
preallocated scratch slots ``[B, Hkv, k, D]`` that the sparse decode kernel reads. The work is:

1. :func:`deltakv_gather_latents` -- one kernel: gather each pick's latent row and dequantise it (int8 with a
   per-token scale, int4 packed with a float16 minimum and step per group, or plain float): ``[B, k, r]``.
2. ``up`` -- the compressor's own module, one batched GEMM (``[B*k, r] x [r, Dx]`` for a linear ``up``; an MLP is
   two). A GEMM inside the writeback kernel would re-read ``W_up`` (``r * Dx``) once per token program, while one
   batched matmul reads it once (on CPU, one thread, ``k = 819, r = 256, Dx = 1024``: 21 ms batched against 88 ms
   as per-token products); and keeping ``up`` in the module keeps the one copy of its math (linear, GELU MLP and
   SwiGLU alike).
3. :func:`deltakv_writeback` -- one kernel: centers / ``up`` output + fathers' mean, split, k_norm, RoPE, store.

Both kernels give a program ``BLOCK_M`` picks of one row and whole rows of their data (the gather ``[BLOCK_M, r]``,
the writeback ``[BLOCK_M, Dx]`` as K rotate-half tiles and a V tile over all KV heads), so the picks' indices are one
vector load, every row read is a contiguous 16-byte-vector load and the writes are 16-byte stores. The first version
ran one program per pick (13,039 at the 128K shape, each a short chain of dependent loads with little work to
overlap it); its gather loaded each 4-bit byte once per nibble (1-byte loads) and each group's step and minimum once
per value, and stored 4 bytes per thread; its writeback re-read the father ids for each of its three sub-tiles.
:func:`rebuild_tile` picks ``BLOCK_M`` and ``num_warps``; both are overridable per call for a sweep
(``benchmarks/bench_deltakv_rebuild.py``).

:func:`deltakv_rebuild_kv` runs the three. Torch versions (the specification, and the CPU path):
:func:`~sparse_hf.kernels.reference.deltakv_gather_latents_ref` and
:func:`~sparse_hf.kernels.reference.deltakv_writeback_ref`.
No shape here depends on device values and nothing syncs with the host, so a CUDA graph can capture it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .dispatch import HAS_TRITON, next_pow2, num_sms, use_triton
from .reference import deltakv_gather_latents_ref, deltakv_stage_raw_ref, deltakv_writeback_ref

_MODES = {None: 0, 8: 8, 4: 4}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _latent_row(p, step, n_lat):
        p = tl.maximum(p, 0)
        return tl.minimum(tl.maximum(p - p // step - 1, 0), tl.maximum(n_lat - 1, 0))

    @triton.jit
    def _pick_tile(PICK, k, sp_b, sp_k, BLOCK_M: tl.constexpr):
        """The row ``b`` of program ``program_id(0)`` (one per row and tile of ``BLOCK_M`` picks), its pick slots
        ``j [BLOCK_M]`` (``jm``: ``j < k``) and their offsets ``p`` (one vector load; 0 where masked)."""
        tiles = tl.cdiv(k, BLOCK_M)
        t = tl.program_id(0)
        b = (t // tiles).to(tl.int64)
        j = ((t % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        jm = j < k
        p = tl.load(PICK + b * sp_b + j * sp_k, mask=jm, other=0).to(tl.int64)
        return b, j, jm, p

    @triton.jit
    def _latent_tile(CODES, SCALE, OFFSET, b, row, jm, sc_b, sc_n, ss_b, ss_n, so_b, so_n,
                     R: tl.constexpr, GW: tl.constexpr, MODE: tl.constexpr, BLOCK_R: tl.constexpr):
        """``[BLOCK_M, BLOCK_R]`` fp32 dequantised latents of the latent rows ``row [BLOCK_M]`` (zeros past ``R`` and
        at masked picks). Each row's codes are one contiguous load (vectorised); a 4-bit byte's two nibbles are
        dequantised with the byte's group step and minimum (one load per byte, not per value: ``GW`` must be even)
        and interleaved in registers (low nibble = even index)."""
        i = tl.arange(0, BLOCK_R)
        m = jm[:, None] & (i < R)[None, :]
        base = CODES + b * sc_b + row[:, None] * sc_n
        if MODE == 0:
            z = tl.load(base + i[None, :], mask=m, other=0.0).to(tl.float32)
        elif MODE == 8:
            s = tl.load(SCALE + b * ss_b + row * ss_n, mask=jm, other=0.0).to(tl.float32)
            z = tl.load(base + i[None, :], mask=m, other=0).to(tl.float32) * s[:, None]
        else:
            c = tl.arange(0, BLOCK_R // 2)
            cm = jm[:, None] & (c < R // 2)[None, :]
            byte = tl.load(base + c[None, :], mask=cm, other=0).to(tl.int32)                 # [BLOCK_M, BLOCK_R/2]
            g = (2 * c // GW)[None, :]     # a byte's group (GW even: both nibbles in it); L1 hits after a group's first
            s = tl.load(SCALE + b * ss_b + row[:, None] * ss_n + g, mask=cm, other=0.0).to(tl.float32)
            o = tl.load(OFFSET + b * so_b + row[:, None] * so_n + g, mask=cm, other=0.0).to(tl.float32)
            z = tl.interleave((byte & 15).to(tl.float32) * s + o, ((byte >> 4) & 15).to(tl.float32) * s + o)
        return z

    @triton.jit
    def _gather_latents_kernel(PICK, CODES, SCALE, OFFSET, OUT, k, step, n_lat,
                               sp_b, sp_k, sc_b, sc_n, ss_b, ss_n, so_b, so_n, sz_b, sz_k,
                               R: tl.constexpr, GW: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_R: tl.constexpr):
        # one program per (row, tile of BLOCK_M picks): the picks' indices in one load, their latent rows as one tile
        b, j, jm, p = _pick_tile(PICK, k, sp_b, sp_k, BLOCK_M)
        row = _latent_row(p, step, n_lat)
        z = _latent_tile(CODES, SCALE, OFFSET, b, row, jm, sc_b, sc_n, ss_b, ss_n, so_b, so_n, R, GW, MODE, BLOCK_R)
        i = tl.arange(0, BLOCK_R)
        tl.store(OUT + b * sz_b + j[:, None] * sz_k + i[None, :], z.to(OUT.dtype.element_ty),
                 mask=jm[:, None] & (i < R)[None, :])

    @triton.jit
    def _writeback_kernel(PICK, UP, FATH, CX, COS, SIN, KW, KOUT, VOUT,
                          k, step, num_sink, n_centers, n_lat, eps,
                          sp_b, sp_k, su_b, su_k, sf_b, sf_n, scx_b, scx_m, sc_b, sc_k, ss_b, ss_k,
                          sko_b, sko_h, sko_k, svo_b, svo_h, svo_k,
                          HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, NBR: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, HALF_BLOCK: tl.constexpr,
                          BLOCK_DV: tl.constexpr, HAS_LAT: tl.constexpr, HAS_KNORM: tl.constexpr):
        # one program per (row, tile of BLOCK_M picks), all KV heads: K as two rotate-half tiles
        # [BLOCK_M, BLOCK_H, D/2], V as [BLOCK_M, BLOCK_H, DV]. Every source row (up output, each father's center, a
        # center's own row) is read once, as whole-row slices; RoPE tables once per pick, shared by the heads.
        b, j, jm, p = _pick_tile(PICK, k, sp_b, sp_k, BLOCK_M)
        pc = tl.maximum(p, 0)
        is_center = (pc % step) == 0
        cidx = tl.minimum(num_sink + pc // step, n_centers - 1)
        lat = jm & (is_center == 0)
        HALF: tl.constexpr = D // 2
        h = tl.arange(0, BLOCK_H)[None, :, None]
        d = tl.arange(0, HALF_BLOCK)[None, None, :]
        e = tl.arange(0, BLOCK_DV)[None, None, :]
        row_m = jm[:, None, None] & (h < HKV)
        km = row_m & (d < HALF)                                                   # [BLOCK_M, BLOCK_H, HALF_BLOCK]
        vm = row_m & (e < DV)                                                     # [BLOCK_M, BLOCK_H, BLOCK_DV]
        k_offs = h * D + d
        v_offs = HKV * D + h * DV + e
        # loads that need only the picks first (up rows, RoPE tables), then the chain father ids -> fathers' rows
        dd = tl.arange(0, HALF_BLOCK)
        dm = dd < HALF
        rm = jm[:, None] & dm[None, :]
        cb = COS + b * sc_b + j[:, None] * sc_k + dd[None, :]                        # [BLOCK_M, HALF_BLOCK]
        sb = SIN + b * ss_b + j[:, None] * ss_k + dd[None, :]
        c_lo = tl.load(cb, mask=rm, other=0.0)
        c_hi = tl.load(cb + HALF, mask=rm, other=0.0)
        s_lo = tl.load(sb, mask=rm, other=0.0)
        s_hi = tl.load(sb + HALF, mask=rm, other=0.0)
        if HAS_LAT:
            ub = UP + b * su_b + j[:, None, None] * su_k
            um = lat[:, None, None]
            up_lo = tl.load(ub + k_offs, mask=km & um, other=0.0)
            up_hi = tl.load(ub + k_offs + HALF, mask=km & um, other=0.0)
            up_v = tl.load(ub + v_offs, mask=vm & um, other=0.0)
            row = _latent_row(p, step, n_lat)
        # x = mean of the source rows (a center: its own row; a latent token: its fathers, -1 skipped) + up output
        lo = tl.zeros([BLOCK_M, BLOCK_H, HALF_BLOCK], tl.float32)
        hi = tl.zeros([BLOCK_M, BLOCK_H, HALF_BLOCK], tl.float32)
        v = tl.zeros([BLOCK_M, BLOCK_H, BLOCK_DV], tl.float32)
        cnt = tl.zeros([BLOCK_M], tl.float32)
        for f in tl.static_range(NBR):
            if HAS_LAT:
                src = tl.load(FATH + b * sf_b + row * sf_n + f, mask=lat, other=-1).to(tl.int64)
                if f == 0:
                    src = tl.where(is_center & jm, cidx, src)
            else:
                src = tl.where(jm, cidx, -1)
            ok = src >= 0
            base = CX + b * scx_b + tl.maximum(src, 0)[:, None, None] * scx_m
            okm = ok[:, None, None]
            lo += tl.load(base + k_offs, mask=km & okm, other=0.0).to(tl.float32)
            hi += tl.load(base + k_offs + HALF, mask=km & okm, other=0.0).to(tl.float32)
            v += tl.load(base + v_offs, mask=vm & okm, other=0.0).to(tl.float32)
            cnt += ok.to(tl.float32)
        cnt = tl.maximum(cnt, 1.0)[:, None, None]
        lo = lo / cnt
        hi = hi / cnt
        v = v / cnt
        if HAS_LAT:
            lo += up_lo.to(tl.float32)
            hi += up_hi.to(tl.float32)
            v += up_v.to(tl.float32)
        tl.store(VOUT + b * svo_b + h * svo_h + j[:, None, None] * svo_k + e, v.to(VOUT.dtype.element_ty), mask=vm)
        if HAS_KNORM:
            inv = (1.0 / tl.sqrt((tl.sum(lo * lo, 2) + tl.sum(hi * hi, 2)) / D + eps))[:, :, None]   # per head
            lo = lo * inv * tl.load(KW + dd, mask=dm, other=0.0).to(tl.float32)[None, None, :]
            hi = hi * inv * tl.load(KW + HALF + dd, mask=dm, other=0.0).to(tl.float32)[None, None, :]
        c_lo, c_hi = c_lo.to(tl.float32)[:, None, :], c_hi.to(tl.float32)[:, None, :]
        s_lo, s_hi = s_lo.to(tl.float32)[:, None, :], s_hi.to(tl.float32)[:, None, :]
        kb = KOUT + b * sko_b + h * sko_h + j[:, None, None] * sko_k + d
        tl.store(kb, (lo * c_lo - hi * s_lo).to(KOUT.dtype.element_ty), mask=km)
        tl.store(kb + HALF, (hi * c_hi + lo * s_hi).to(KOUT.dtype.element_ty), mask=km)

    @triton.jit
    def _stage_raw_kernel(K, V, P, COLS, KW, VW, PW, cap, s,
                          sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sp_b, sp_h, sp_n, sc_b, sc_k,
                          skw_b, skw_h, skw_n, svw_b, svw_h, svw_n, spw_b, spw_h, spw_n,
                          HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        # one program per (row, KV head, block of work slots): raw K/V/columns below cap, the picks' columns after
        bh = tl.program_id(0)
        b = (bh // HKV).to(tl.int64)
        h = (bh % HKV).to(tl.int64)
        n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        raw = n < cap
        tail = (n >= cap) & (n < cap + s)
        d = tl.arange(0, BLOCK_D)
        km = raw[:, None] & (d < D)[None, :]
        kk = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=km)
        tl.store(KW + b * skw_b + h * skw_h + n[:, None] * skw_n + d[None, :], kk, mask=km)
        e = tl.arange(0, BLOCK_DV)
        vm = raw[:, None] & (e < DV)[None, :]
        vv = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + e[None, :], mask=vm)
        tl.store(VW + b * svw_b + h * svw_h + n[:, None] * svw_n + e[None, :], vv, mask=vm)
        p = tl.load(P + b * sp_b + h * sp_h + n * sp_n, mask=raw, other=-1)
        c = tl.load(COLS + b * sc_b + (n - cap) * sc_k, mask=tail, other=-1)
        tl.store(PW + b * spw_b + h * spw_h + n * spw_n, tl.where(raw, p, c.to(p.dtype)), mask=raw | tail)


def deltakv_stage_raw(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor,
                      k_work: torch.Tensor, v_work: torch.Tensor, pos_work: torch.Tensor, backend: str = "auto") -> None:
    """One launch for what a static DeltaKV decode step puts in the shared work buffer besides the rebuilt K/V: the
    layer's raw slots ``k``/``v``/``pos`` ``[B, Hkv, cap, *]`` at ``[0, cap)`` and the picks' columns ``cols [B, s]``
    (every KV head) at ``[cap, cap + s)`` (see :func:`deltakv_stage_raw_ref`, four copies)."""
    if not use_triton(backend, _stage_raw_kernel if HAS_TRITON else None, k_work, v_work):
        return deltakv_stage_raw_ref(k, v, pos, cols, k_work, v_work, pos_work)
    B, Hkv, cap, D = k.shape
    s, Dv = cols.shape[1], v.shape[-1]
    if pos_work.shape[2] < cap + s or pos.dtype != pos_work.dtype or k.dtype != k_work.dtype:
        raise ValueError(f"deltakv_stage_raw: {cap} raw slots and {s} columns do not fit the work buffer "
                         f"{tuple(pos_work.shape)}, or the dtypes differ")
    _check_last_contiguous(k=k, v=v, k_work=k_work, v_work=v_work)
    block_n = 32
    grid = (B * Hkv, triton.cdiv(cap + s, block_n))
    if B * Hkv * (cap + s) == 0:
        return None
    _stage_raw_kernel[grid](k, v, pos, cols, k_work, v_work, pos_work, cap, s, *k.stride()[:3], *v.stride()[:3],
                            *pos.stride(), *cols.stride(), *k_work.stride()[:3], *v_work.stride()[:3],
                            *pos_work.stride(), HKV=Hkv, D=D, DV=Dv, BLOCK_N=block_n, BLOCK_D=next_pow2(D),
                            BLOCK_DV=next_pow2(Dv), num_warps=4)
    return None


def _check_last_contiguous(**tensors):
    for name, t in tensors.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (got strides {t.stride()})")


#: Tile heuristic of the gather and writeback kernels: a program owns ``BLOCK_M`` picks of one row and whole rows of
#: their data (the gather ``[BLOCK_M, r]``, the writeback ``[BLOCK_M, Dx]``), at most ``REBUILD_TILE_ELEMS`` values,
#: and ``BLOCK_M`` halves (down to ``REBUILD_MIN_BLOCK``) until about ``REBUILD_PROGRAMS_PER_SM`` programs run per SM.
#: Chosen from first principles (the 128K shape, 13,039 picks: 815 gather and 1,630 writeback programs on 132 SMs);
#: not yet swept on a GPU (``benchmarks/bench_deltakv_rebuild.py --gather-block ... --writeback-block ...``).
REBUILD_TILE_ELEMS = 8192
REBUILD_PROGRAMS_PER_SM = 4
REBUILD_MIN_BLOCK = 4


def rebuild_tile(rows: int, k: int, row_elems: int, device: torch.device, block_m: int | None = None,
                 num_warps: int | None = None) -> tuple[int, int]:
    """``(block_m, num_warps)`` of a rebuild kernel over ``rows`` rows of ``k`` picks, each pick ``row_elems``
    values wide (padded to powers of two). ``block_m`` / ``num_warps`` given: kept (``block_m`` a power of two);
    ``num_warps`` defaults to one warp per 1,024 values of the tile (32 per thread), 2 to 8."""
    if block_m is None:
        block_m = max(1, min(64, REBUILD_TILE_ELEMS // row_elems, next_pow2(k)))
        block_m = 1 << (block_m.bit_length() - 1)                                 # a power of two, not above
        while block_m > REBUILD_MIN_BLOCK and rows * -(-k // block_m) < REBUILD_PROGRAMS_PER_SM * num_sms(device):
            block_m //= 2
    elif block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    if num_warps is None:
        num_warps = min(8, max(2, next_pow2(block_m * row_elems // 1024)))
    return block_m, num_warps


def group_width(r: int, scale: torch.Tensor | None, mode: int) -> int:
    """Latent values per 4-bit group (``GW``; 1 in the other modes). The kernels dequantise a byte's two codes with
    one group's step and minimum, so ``GW`` must be even (quantize's groups: 32 values, or the whole even row)."""
    if mode != 4:
        return 1
    gw, rem = divmod(r, scale.shape[-1])
    if rem or gw % 2:
        raise ValueError(f"4-bit latents of width {r} in {scale.shape[-1]} groups: a group must hold an even "
                         f"number of values")
    return gw


def gather_width(r: int) -> int:
    """The gather kernel's padded latent width ``BLOCK_R`` (values per pick in its tile)."""
    return max(2, next_pow2(r))


def writeback_widths(Hkv: int, D: int, Dv: int) -> tuple[int, int, int]:
    """The writeback kernel's padded ``(BLOCK_H, HALF_BLOCK, BLOCK_DV)``; a pick's tile row holds
    ``BLOCK_H * (2 * HALF_BLOCK + BLOCK_DV)`` values."""
    return next_pow2(Hkv), next_pow2(D // 2), next_pow2(Dv)


def deltakv_gather_latents(pick: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None,
                           offset: torch.Tensor | None, step: int, dtype: torch.dtype,
                           backend: str = "auto", block_m: int | None = None,
                           num_warps: int | None = None) -> torch.Tensor:
    """``[B, k, r]`` dequantised latents of the picked offsets (see :func:`deltakv_gather_latents_ref`).
    ``block_m`` / ``num_warps``: the kernel's tile (picks per program) and warps, :func:`rebuild_tile`'s if None."""
    mode = 0 if scale is None else (8 if offset is None else 4)
    if not use_triton(backend, _gather_latents_kernel if HAS_TRITON else None, codes if mode == 0 else scale):
        return deltakv_gather_latents_ref(pick, codes, scale, offset, step, dtype)
    B, k = pick.shape
    r = codes.shape[-1] * (2 if mode == 4 else 1)
    _check_last_contiguous(codes=codes, scale=scale, offset=offset)
    out = torch.empty(B, k, r, dtype=dtype, device=codes.device)
    if B * k == 0:
        return out
    block_r = gather_width(r)
    block_m, num_warps = rebuild_tile(B, k, block_r, codes.device, block_m, num_warps)
    dummy = codes
    _gather_latents_kernel[(B * triton.cdiv(k, block_m),)](
        pick, codes, scale if scale is not None else dummy, offset if offset is not None else dummy, out,
        k, step, codes.shape[1], pick.stride(0), pick.stride(1), codes.stride(0), codes.stride(1),
        *(scale.stride()[:2] if scale is not None else (0, 0)),
        *(offset.stride()[:2] if offset is not None else (0, 0)),
        out.stride(0), out.stride(1),
        R=r, GW=group_width(r, scale, mode), MODE=mode, BLOCK_M=block_m, BLOCK_R=block_r,
        num_warps=num_warps)
    return out


def deltakv_writeback(pick: torch.Tensor, up_out: torch.Tensor | None, fathers: torch.Tensor | None,
                      center_x: torch.Tensor, step: int, num_sink: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_out: torch.Tensor, v_out: torch.Tensor, k_norm_weight: torch.Tensor | None = None,
                      k_norm_eps: float = 1e-6, backend: str = "auto", block_m: int | None = None,
                      num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuilt K/V into ``k_out [B, Hkv, k, D]`` / ``v_out [B, Hkv, k, Dv]`` (any strides, last dim contiguous);
    see :func:`deltakv_writeback_ref` for the math. ``block_m`` / ``num_warps``: the kernel's tile (picks per
    program, all heads) and warps, :func:`rebuild_tile`'s if None."""
    if not use_triton(backend, _writeback_kernel if HAS_TRITON else None, center_x, k_out, v_out):
        return deltakv_writeback_ref(pick, up_out, fathers, center_x, step, num_sink, cos, sin, k_out, v_out,
                                     k_norm_weight, k_norm_eps)
    B, k = pick.shape
    _, Hkv, _, D = k_out.shape
    Dv = v_out.shape[-1]
    if D % 2 or center_x.shape[-1] != Hkv * (D + Dv):
        raise ValueError(f"center_x width {center_x.shape[-1]} is not Hkv * (D + Dv) = {Hkv} * ({D} + {Dv}), "
                         f"or D is odd")
    has_lat = up_out is not None and fathers is not None and fathers.shape[1] > 0
    _check_last_contiguous(center_x=center_x, up_out=up_out if has_lat else None, cos=cos, sin=sin,
                           k_out=k_out, v_out=v_out)
    if B * k == 0:
        return k_out, v_out
    fath = fathers if has_lat else pick
    up = up_out if has_lat else center_x
    block_h, half_block, block_dv = writeback_widths(Hkv, D, Dv)
    block_m, num_warps = rebuild_tile(B, k, block_h * (2 * half_block + block_dv), center_x.device, block_m,
                                      num_warps)
    _writeback_kernel[(B * triton.cdiv(k, block_m),)](
        pick, up, fath, center_x, cos, sin, k_norm_weight if k_norm_weight is not None else cos, k_out, v_out,
        k, step, num_sink, center_x.shape[1], fath.shape[1] if has_lat else 0, float(k_norm_eps),
        pick.stride(0), pick.stride(1), up.stride(0), up.stride(1), fath.stride(0), fath.stride(1),
        center_x.stride(0), center_x.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        k_out.stride(0), k_out.stride(1), k_out.stride(2), v_out.stride(0), v_out.stride(1), v_out.stride(2),
        HKV=Hkv, D=D, DV=Dv, NBR=fath.shape[-1] if has_lat else 1, BLOCK_M=block_m, BLOCK_H=block_h,
        HALF_BLOCK=half_block, BLOCK_DV=block_dv, HAS_LAT=has_lat, HAS_KNORM=k_norm_weight is not None,
        num_warps=num_warps)
    return k_out, v_out


def deltakv_rebuild_kv(pick: torch.Tensor, codes: torch.Tensor | None, scale: torch.Tensor | None,
                       offset: torch.Tensor | None, fathers: torch.Tensor | None, center_x: torch.Tensor,
                       up: Callable[[torch.Tensor], torch.Tensor], up_dtype: torch.dtype, step: int, num_sink: int,
                       cos: torch.Tensor, sin: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                       k_norm_weight: torch.Tensor | None = None, k_norm_eps: float = 1e-6,
                       backend: str = "auto", up_linear: tuple[torch.Tensor, torch.Tensor | None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild picked DeltaKV tokens into scratch slots: gather + dequantise, ``up`` (one batched GEMM), then
    fathers' mean, split, k_norm and RoPE, written to ``k_out``/``v_out``. With ``up_linear = (weight, bias)`` (a
    linear ``up``, ``nn.Linear`` layout) and Triton running, all of it in one launch
    (:func:`~sparse_hf.kernels.deltakv_fused.deltakv_rebuild_fused`), without the latents and ``up`` output in memory.

    Args:
        pick: ``[B, k]`` compressed offsets (``-1``: filler; its slot gets garbage, its column must be ``-1``).
        codes, scale, offset: the stored latents (see :func:`deltakv_gather_latents_ref`); ``codes`` None when
            there are none yet (every compressed token a center).
        fathers: ``[B, N', nbr]`` center ids per latent row; center_x: ``[B, M, Dx]`` raw centers.
        up: ``z [B, k, r] -> [B, k, Dx]`` (the layer's ``up`` projection); up_dtype: its input dtype.
        step, num_sink: the clustering (center distance, sinks per row).
        cos, sin: ``[B, k, D]`` RoPE tables at each pick's position.
        k_out, v_out: ``[B, Hkv, k, D]`` / ``[B, Hkv, k, Dv]`` scratch slots, written in place.
        k_norm_weight, k_norm_eps: Qwen3's per-head RMS ``k_norm`` (``None``: none).

    Returns:
        ``(k_out, v_out)``.
    """
    from .deltakv_fused import deltakv_rebuild_fused, fused_rebuild_runs   # it imports this module's helpers

    up_out = None
    has_lat = codes is not None and fathers is not None and codes.shape[1] > 0
    if has_lat and up_linear is not None and fused_rebuild_runs(backend, center_x, up_linear[0]):
        return deltakv_rebuild_fused(pick, codes, scale, offset, fathers, center_x, up_linear[0], up_linear[1], step,
                                     num_sink, cos, sin, k_out, v_out, k_norm_weight, k_norm_eps)
    if has_lat:
        z = deltakv_gather_latents(pick, codes, scale, offset, step, up_dtype, backend)
        up_out = up(z).contiguous()
    return deltakv_writeback(pick, up_out, fathers, center_x, step, num_sink, cos, sin, k_out, v_out,
                             k_norm_weight, k_norm_eps, backend)
