"""Prefill attention over a slot pool: packed prompt chunks attend causally to their rows' slots, read in place.

Why: a chunk of a long prompt attends to every earlier token of its row. Gathering the row's slots into a
contiguous K/V copy first (then SDPA) costs a copy of the whole context per chunk and layer, and the memory of
that copy. This flash-attention kernel reads each key/value tile straight from the pool through the row's slot
table (``K[tables[row, j]]``), for any number of chunks of different rows packed in one ``[T, H, D]`` batch
(variable lengths, no padding).

Layout of the work: program ``(h, tile)`` runs query head ``h`` over ``BLOCK_M`` queries of one segment's chunk,
with an online softmax in fp32 (log2 domain). Query ``i`` of a chunk of ``n`` tokens whose row holds ``context``
slots sees keys ``0 .. context - n + i`` (causal, aligned lower-right). Key tiles every query of the tile sees
run without masks; the few tiles across the diagonal are masked; tiles past it are skipped (half the work of a
square chunk). Heads are the fastest grid axis, so the ``G`` heads of a KV group run side by side and share its
K/V tiles in L2. Tiles are launched heaviest first (most keys), which balances the causal triangle.
"""

from __future__ import annotations

import numpy as np
import torch

from .dispatch import HAS_TRITON, next_pow2, tl, triton, use_triton
from .group_tiles import online_softmax_step
from .reference import paged_prefill_attention_ref
from .sparse_decode import LOG2E, dot_config

#: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` on the GPU: the fastest of :data:`CONFIGS` on the H200
#: (benchmarks/bench_paged_prefill.py, 2026-12-02: 388 TFLOP/s for an 8192-query chunk over 131072 keys, bf16, 7B heads;
#: (128, 64, 8, 3) 271, (64, 64, 4, 3) 306, (128, 128, 8, 2) 201).
DEFAULT_CONFIG = (128, 64, 4, 3)
#: The few configurations the micro-benchmark tries.
CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2))

if HAS_TRITON:

    @triton.jit
    def _paged_prefill_kernel(
        Q, K, V, TABLES, TILES, OUT, LSE, qk_scale,
        sq_t, sq_h, sq_d, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d, st_r, st_w, so_t, so_h, so_d, sl_t, sl_h,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_F32: tl.constexpr, PREC: tl.constexpr, HAS_LSE: tl.constexpr,
    ):
        h = tl.program_id(0)
        tile = tl.program_id(1)
        info = TILES + tile * 5                        # (row, start, length, context, first query of the tile)
        row = tl.load(info).to(tl.int64)
        start = tl.load(info + 1)
        n = tl.load(info + 2)
        context = tl.load(info + 3)
        m0 = tl.load(info + 4)
        kvh = h // G
        offs_m = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        qm = offs_m < n
        tok = (start + offs_m).to(tl.int64)
        q = tl.load(Q + tok[:, None] * sq_t + h * sq_h + d[None, :] * sq_d, mask=qm[:, None] & dm[None, :],
                    other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        prefix = context - n                           # keys before the chunk
        last = prefix + offs_m                         # [BLOCK_M] last key each query sees
        full_end = (prefix + m0 + 1) // BLOCK_N * BLOCK_N      # key tiles below it: every query sees every key
        causal_end = prefix + tl.minimum(m0 + BLOCK_M, n)      # keys at or past it: no query of the tile sees them
        table = TABLES + row * st_r
        k_base = K + kvh * sk_h
        v_base = V + kvh * sv_h
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)    # running max (log2 domain), finite: no inf-inf NaN
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        offs_n0 = tl.arange(0, BLOCK_N)
        for n0 in range(0, full_end, BLOCK_N):
            slots = tl.load(table + (n0 + offs_n0) * st_w).to(tl.int64)
            kt = tl.load(k_base + slots[:, None] * sk_s + d[None, :] * sk_d, mask=dm[None, :], other=0.0)
            vt = tl.load(v_base + slots[:, None] * sv_s + d[None, :] * sv_d, mask=dm[None, :], other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale          # [BLOCK_M, BLOCK_N]
            m, l, acc = online_softmax_step(s, vt, m, l, acc, PREC)
        for n0 in range(full_end, causal_end, BLOCK_N):
            offs_n = n0 + offs_n0
            km = offs_n < causal_end
            slots = tl.load(table + offs_n * st_w, mask=km, other=0).to(tl.int64)
            kv_mask = km[:, None] & dm[None, :]
            kt = tl.load(k_base + slots[:, None] * sk_s + d[None, :] * sk_d, mask=kv_mask, other=0.0)
            vt = tl.load(v_base + slots[:, None] * sv_s + d[None, :] * sv_d, mask=kv_mask, other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
            visible = (offs_n[None, :] <= last[:, None]) & km[None, :]
            m, l, acc = online_softmax_step(tl.where(visible, s, float("-inf")), vt, m, l, acc, PREC)
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(OUT + tok[:, None] * so_t + h * so_h + d[None, :] * so_d, o.to(OUT.dtype.element_ty),
                 mask=qm[:, None] & dm[None, :])
        if HAS_LSE:                                    # natural-log log-sum-exp of each query (H2O's mass reuses it)
            lse = tl.where(l > 0, (m + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(LSE + tok * sl_t + h * sl_h, lse, mask=qm)
else:  # pragma: no cover - exercised only without triton
    _paged_prefill_kernel = None


def check_segments(segments, T: int, width: int) -> list[tuple[int, int, int, int]]:
    """``segments`` as ``(row, start, length, context)`` int tuples, each inside ``T`` packed tokens and a slot
    table of ``width`` columns with ``1 <= length <= context``; anything else raises ``ValueError``."""
    out = []
    for seg in segments:
        row, start, length, context = (int(x) for x in seg)
        if not (length >= 1 and 0 <= start and start + length <= T and length <= context <= width and row >= 0):
            raise ValueError(f"bad segment (row={row}, start={start}, length={length}, context={context}) for "
                             f"{T} packed queries and a slot table of width {width}: need 1 <= length <= context "
                             f"<= width and start + length <= T")
        out.append((row, start, length, context))
    return out


def launch_config(segments, device: torch.device, config=None) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for a call: ``config`` or :data:`DEFAULT_CONFIG` on the GPU;
    under the interpreter (CPU tensors) tiles shrink to the problem, which keeps the tests fast."""
    block_m, block_n, num_warps, num_stages = config or DEFAULT_CONFIG
    if device.type != "cuda":
        longest = max((int(s[2]) for s in segments), default=1)
        block_m, block_n = min(block_m, max(16, next_pow2(longest))), min(block_n, 16)
    return block_m, block_n, num_warps, num_stages


def prefill_tiles(segments, block_m: int, device) -> torch.Tensor:
    """``[n_tiles, 5]`` int32 ``(row, start, length, context, m0)`` of every ``block_m``-query tile of every
    segment, heaviest first (most keys to visit), on ``device``: the kernel's work list."""
    rows = [(row, start, length, context, m0) for row, start, length, context in segments
            for m0 in range(0, length, block_m)]
    tiles = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    work = tiles[:, 3] - tiles[:, 2] + np.minimum(tiles[:, 4] + block_m, tiles[:, 2])
    tiles = tiles[np.argsort(-work, kind="stable")]
    return torch.as_tensor(tiles.astype(np.int32)).to(device, non_blocking=True)


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                            segments, scale: float | None = None, backend: str = "auto", *,
                            config: tuple[int, int, int, int] | None = None,
                            tiles: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed prompt chunks over their rows' slots in a KV pool, read in place.

    Args:
        q: ``[T, H, D]`` post-RoPE queries of every chunk, packed (any strides).
        k_pool, v_pool: ``[S, Hkv, D]`` slot pools (``H % Hkv == 0``; query head ``h`` reads KV head
            ``h // (H // Hkv)``), any strides, same dtype.
        tables: ``[rows, W]`` int slot table: entry ``j`` of row ``r`` is the slot of the row's ``j``-th token.
        segments: ``[(row, start, length, context), ...]`` host ints: queries ``start .. start + length`` of ``q``
            are the last ``length`` of the row's ``context`` tokens (its slots ``tables[row, :context]``, the
            chunk's own K/V already written). Query ``i`` of the chunk sees keys ``0 .. context - length + i``.
            Queries outside every segment get zeros.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :func:`sparse_hf.kernels.dispatch.use_triton`).
        config: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, default :data:`DEFAULT_CONFIG` (tiles shrink to the
            problem under the interpreter).
        tiles: the work list, ``prefill_tiles(segments, launch_config(segments, q.device, config)[0], device)``
            (callers running the same segments in every layer build it once).
        lse: optional ``[T, H]`` float32 output (any strides): each segment query's natural-log log-sum-exp of
            ``scale * q.k`` over the keys it sees, written in place (H2O's attention mass reuses it); other
            entries are left as they are.

    Returns:
        ``[T, H, D]`` in ``q.dtype`` (softmax in fp32).
    """
    T, H, D = q.shape
    S, Hkv, Dk = k_pool.shape
    if Dk != D or H % Hkv or v_pool.shape != k_pool.shape or tables.dim() != 2:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, v_pool "
                         f"{tuple(v_pool.shape)}, tables {tuple(tables.shape)} (need [T, H, D], [S, Hkv, D] with "
                         f"H % Hkv == 0, and a 2-D table)")
    segments = check_segments(segments, T, tables.shape[1])
    scale = D ** -0.5 if scale is None else float(scale)
    if lse is not None and (lse.shape != (T, H) or lse.dtype != torch.float32):
        raise ValueError(f"lse must be a [T, H] = {(T, H)} float32 tensor, got {tuple(lse.shape)} {lse.dtype}")
    if not use_triton(backend, _paged_prefill_kernel, q, k_pool, v_pool):
        return paged_prefill_attention_ref(q, k_pool, v_pool, tables, segments, scale, lse=lse)
    if v_pool.dtype != k_pool.dtype:
        raise TypeError(f"k_pool and v_pool dtypes differ: {k_pool.dtype} vs {v_pool.dtype}")
    block_m, block_n, num_warps, num_stages = launch_config(segments, q.device, config)
    covered = sum(s[2] for s in segments) == T
    out = (torch.empty if covered else torch.zeros)(T, H, D, dtype=q.dtype, device=q.device)
    if not segments:
        return out
    if tiles is None:
        tiles = prefill_tiles(segments, block_m, q.device)
    elif tiles.shape != (sum(-(-s[2] // block_m) for s in segments), 5) or tiles.device != q.device:
        raise ValueError(f"tiles {tuple(tiles.shape)} on {tiles.device} do not match these segments at BLOCK_M="
                         f"{block_m}; build them with prefill_tiles(segments, launch_config(segments, device, "
                         f"config)[0], device)")
    qk = q if q.dtype == k_pool.dtype else q.to(k_pool.dtype)
    dot_f32, prec = dot_config(_paged_prefill_kernel, k_pool.dtype)
    _paged_prefill_kernel[(H, tiles.shape[0])](
        qk, k_pool, v_pool, tables, tiles, out, out if lse is None else lse, scale * LOG2E,
        *qk.stride(), *k_pool.stride(), *v_pool.stride(), *tables.stride(), *out.stride(),
        *((0, 0) if lse is None else lse.stride()),
        G=H // Hkv, D=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_F32=dot_f32, PREC=prec, HAS_LSE=lse is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return out
