"""Attention over the KV pool, driven by a per-step context that the runner fills.

``PoolAttention.attend(layer, q, k, v, scale)`` first stores the step's K/V at their slots, then:

- prefill (``ctx.segments``): each chunk attends to the row's earlier slots plus itself, causally (lower-right).
  On CUDA a long chunk runs cuDNN's fused SDPA as unmasked attention over its gathered earlier slots plus
  square-causal attention over itself, merged by log-sum-exp (:mod:`sparse_hf.kernels.sdpa_split`, the fastest
  route measured on the H200), and the short chunks of a step share one launch of
  :func:`~sparse_hf.kernels.paged_prefill_attention`, which reads K/V in place through the slot tables (also the
  route wherever cuDNN cannot run). Elsewhere (CPU) each
  chunk gathers its row's slots and runs SDPA with a lower-right causal bias (:func:`chunk_attention`);
- decode (one token per row): ``sparse_decode_attention`` reads the pool in place through the rows' slot tables
  (``[B, Hkv, W]`` index lists, the pool expanded over rows with stride 0). OmniKV's observation layers score
  every token with ``decode_attention_with_scores`` and pick a selection that the sparse layers after them read;
- mixed (``ctx.segments`` and ``ctx.tables``): the step's first ``sum(seg.length)`` tokens are prompt chunks (as
  in prefill), the rest one decode token per row of ``ctx.tables`` (as in decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from sparse_hf.kernels import decode_attention_with_scores, paged_prefill_attention, sparse_decode_attention
from sparse_hf.kernels.attention_lse import efficient_attention_with_lse, sdpa_with_lse_cpu
from sparse_hf.kernels.dispatch import kernels_run_fused
from sparse_hf.kernels.omnikv_scores import range_softmax_max, range_softmax_max_kernel_runs
from sparse_hf.kernels.paged_prefill import launch_config, prefill_tiles
from sparse_hf.kernels.sdpa_split import SplitUnavailable, split_chunk_attention

#: A chunk of at least this many queries takes the split cuDNN route under ``prefill_route="auto"``; shorter ones
#: share one paged-kernel launch (per-call overhead would dominate two SDPA calls and a merge per small chunk).
SPLIT_MIN_QUERIES = 1024
#: The prefill route of an fp32 pool on CUDA. cuDNN refuses fp32 (so ``"auto"`` would run every chunk through the
#: paged Triton kernel, whose fp32 ``tl.dot`` takes exact "ieee" products on the CUDA cores with tiles tuned for
#: bf16), while SDPA's memory-efficient kernel runs fp32 on the tensor cores in three-pass TF32 (fp32 accuracy) and is
#: what the HF path runs: ``"gather"`` takes it (:func:`chunk_attention`). Suspected cause of the fp32 accuracy grid's
#: ~1,200 prompt tokens/s per process on the H200 (docs/benchmarks.md, run M); measured by
#: ``benchmarks/bench_paged_prefill.py --dtype float32 --heads 9,3,64`` (to run). ``None``: the dtype-blind choice.
FP32_PREFILL_ROUTE: str | None = "gather"


def default_prefill_route(t: torch.Tensor) -> str:
    """The :attr:`PoolAttention.prefill_route` for a pool like ``t``: ``"auto"`` where the Triton kernels run (CUDA),
    except :data:`FP32_PREFILL_ROUTE` for fp32 there; ``"gather"`` elsewhere (CPU)."""
    if not kernels_run_fused(t):
        return "gather"
    if t.dtype == torch.float32 and FP32_PREFILL_ROUTE is not None:
        return FP32_PREFILL_ROUTE
    return "auto"


@dataclass
class Segment:
    """One request's chunk in a prefill step: tokens ``[start, start + length)`` of the packed batch, whose row
    holds ``context`` slots once the chunk is written (earlier chunks included)."""

    row: int
    start: int
    length: int
    context: int
    windows: dict = field(default_factory=dict)     # layer -> [H, w, D] last queries of this chunk


@dataclass
class StepContext:
    """What one forward step needs to know beyond the tokens.

    Attributes:
        slot_mapping: ``[G, T]`` long, slot of each new token per slot group.
        segments: prefill chunks (empty for a decode step); in a mixed step they are the first tokens.
        tables: decode rows only, ``[G, B, W]`` int32 slot tables of the batch rows (``None``: no decode rows).
        lens: decode rows only, ``[G, B]`` int32 slots per row (the new token included).
        window: prompt queries to remember per chunk (the method's observation window; 0 = none).
        prefill_tiles: the paged prefill kernel's work list, built at the step's first layer (``None`` before).
    """

    slot_mapping: torch.Tensor
    segments: list[Segment] = field(default_factory=list)
    tables: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    window: int = 0
    selection: torch.Tensor | None = None            # OmniKV: [B, K] slot ids (-1 = none) of the current step
    prefill_tiles: torch.Tensor | None = None

    @property
    def num_prefill_tokens(self) -> int:
        return sum(seg.length for seg in self.segments)


def pool_view(pool: torch.Tensor, batch: int) -> torch.Tensor:
    """``[S, Hkv, D]`` -> ``[B, Hkv, S, D]`` view with stride 0 over rows (what the decode kernels take)."""
    return pool.permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool = False):
    """Causal attention of the last ``n`` of ``L`` tokens.

    Args:
        q: ``[n, H, D]``; k, v: ``[L, Hkv, D]`` with ``L >= n`` (the chunk is the last ``n`` keys).
        return_lse: also return each query's natural-log log-sum-exp ``[n, H]`` float32 where one fused kernel
            gives it (CPU: :func:`~sparse_hf.kernels.attention_lse.sdpa_with_lse_cpu`; CUDA: the memory-efficient
            kernel, :func:`~sparse_hf.kernels.attention_lse.efficient_attention_with_lse`), else ``None``.

    Returns:
        ``[n, H, D]``; with ``return_lse``, ``(out, lse or None)``.
    """
    n, L = q.shape[0], k.shape[0]
    G = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)                                         # [1, H, n, D]
    kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)     # [1, Hkv, L, D]
    if return_lse:
        fused = (sdpa_with_lse_cpu(qh, kh, vh, scale, causal=True) if q.device.type == "cpu"
                 else efficient_attention_with_lse(qh, kh, vh, scale))
        if fused is not None:
            return fused[0][0].transpose(0, 1), fused[1][0].transpose(0, 1)
        return chunk_attention(q, k, v, scale), None
    if G > 1 and q.is_cuda and q.dtype == torch.float32:
        # fp32 on CUDA: the memory-efficient kernel is the only fused one, and torch's checks may refuse it GQA (SDPA
        # then falls back to the math path with a materialised [n, L] mask); a copy of the few KV heads costs less
        kh, vh = kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1)
    # Lower-right causal alignment without a materialised [n, L] mask: flash / memory-efficient kernels on CUDA.
    bias = causal_lower_right(n, L)
    try:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale, enable_gqa=True)
    except (RuntimeError, TypeError, NotImplementedError):     # a kernel without GQA: repeat the KV heads
        out = F.scaled_dot_product_attention(qh, kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1),
                                             attn_mask=bias, scale=scale)
    return out[0].transpose(0, 1)


class PoolAttention:
    """The attention backend of :class:`~.model.EngineModel` over a :class:`~.kv_pool.KVPool`.

    ``method`` is the core sparse method (or ``None``); only OmniKV (the ``"mask"`` family) changes attention
    itself: eviction methods act on the pool after the step (see :mod:`.runner`). ``tp``: the
    :class:`~.tp.TPGroup` when this rank holds only some heads: OmniKV's per-token scores are then all-reduced
    (max) before the top-k, and so are the scores of eviction selections shared by a layer's heads
    (``reduce_heads``), so every rank selects the tokens that one rank with all heads would; unless the group's
    ``exact_selection`` is off (``tp_selection="per_rank"``): then each rank selects from its own heads.
    """

    def __init__(self, pool, method=None, tp=None):
        self.pool = pool
        self.method = method
        exact = tp is not None and tp.size > 1 and tp.exact_selection
        self.reduce_scores = tp.all_reduce_max if exact else None
        self.reduce_heads = tp.reduce_heads if exact else None
        self.mask_family = method is not None and method.family == "mask"
        self.backend = "auto" if pool.device.type == "cuda" else "torch"
        #: How prompt chunks attend (see :meth:`_prefill`): ``"auto"`` where Triton runs (CUDA; fp32 there:
        #: :data:`FP32_PREFILL_ROUTE`), else ``"gather"`` (:func:`default_prefill_route`).
        self.prefill_route = default_prefill_route(pool.k[0])
        self.ctx: StepContext | None = None
        self._stored_layer: int | None = None        # the layer whose K/V the model stored itself (kv_destination)
        #: ``True`` while a CUDA graph's warm-up runs a decode step that its replay will run again (see
        #: :meth:`~.graphs.DecodeGraphs._capture_forward`): side effects that must not happen twice are skipped.
        self.warm_up = False

    def kv_destination(self, layer: int):
        """``(k_pool, v_pool, slot_mapping)`` where this step's new K/V of ``layer`` go (``[S, Hkv, D]`` twice,
        ``[T]``), for a model that stores them in its fused RoPE kernel; the next ``attend(layer, ...)`` then skips
        its own store. A backend that stores K/V elsewhere returns ``None`` (the model then leaves it to
        ``attend``)."""
        self._stored_layer = layer
        return self.pool.k[layer], self.pool.v[layer], self.ctx.slot_mapping[self.pool.group_of[layer]]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` (post-RoPE) -> ``[T, H, D]``."""
        ctx = self.ctx
        g = self.pool.group_of[layer]
        if self._stored_layer != layer:
            self.pool.write(layer, ctx.slot_mapping[g], k, v)
        self._stored_layer = None
        if not ctx.segments:
            return self._decode(layer, g, q, scale)
        if ctx.tables is None:
            return self._prefill(layer, g, q, k, v, scale)
        n = ctx.num_prefill_tokens                                               # a mixed step
        return torch.cat([self._prefill(layer, g, q[:n], k[:n], v[:n], scale), self._decode(layer, g, q[n:], scale)])

    def _prefill(self, layer: int, g: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        return self._prefill_attention(layer, g, q, k, v, scale)[0]

    def _prefill_attention(self, layer: int, g: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float, want_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out [T, H, D], lse)``: every chunk of the step (``k``, ``v``: the step's own K/V), by
        :attr:`prefill_route`, and with ``want_lse`` each query's natural-log log-sum-exp ``[T, H]`` float32 from
        the same attention (``None`` where a route's kernel cannot give it):

        - ``"paged"``: one launch of the paged Triton kernel for every chunk;
        - ``"split"``: per chunk, cuDNN SDPA over its gathered earlier slots plus its own K/V
          (:mod:`sparse_hf.kernels.sdpa_split`);
        - ``"auto"`` (CUDA): chunks of at least :data:`SPLIT_MIN_QUERIES` queries split, the rest paged; where
          cuDNN cannot run the split route, paged from then on;
        - ``"gather"`` (CPU): per chunk, SDPA over its gathered slots with a lower-right causal bias.
        """
        ctx, pool = self.ctx, self.pool
        if ctx.window:
            for seg in ctx.segments:
                # a copy of the few window queries: a view would keep the layer's whole q (with fused RoPE, its
                # whole qkv projection) alive until the prompt completes
                seg.windows[layer] = q[seg.start + seg.length - min(ctx.window, seg.length):
                                       seg.start + seg.length].transpose(0, 1).clone()   # [H, w, D]
        route = self.prefill_route
        lse = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device) if want_lse else None
        if route == "gather":
            out = torch.empty_like(q)
            for seg in ctx.segments:
                slots = pool.tables[g, seg.row, : seg.context].long()
                own = slice(seg.start, seg.start + seg.length)
                if lse is None:
                    out[own] = chunk_attention(q[own], pool.k[layer][slots], pool.v[layer][slots], scale)
                    continue
                out[own], seg_lse = chunk_attention(q[own], pool.k[layer][slots], pool.v[layer][slots], scale,
                                                    return_lse=True)
                if seg_lse is None:
                    lse = None
                else:
                    lse[own] = seg_lse
            return out, lse
        splits = [route == "split" or (route == "auto" and seg.length >= SPLIT_MIN_QUERIES) for seg in ctx.segments]
        split = [seg for seg, s in zip(ctx.segments, splits) if s]
        paged = [(seg.row, seg.start, seg.length, seg.context) for seg, s in zip(ctx.segments, splits) if not s]
        out = None
        if paged:
            if ctx.prefill_tiles is None:
                ctx.prefill_tiles = prefill_tiles(paged, launch_config(paged, q.device)[0], q.device)
            out = paged_prefill_attention(q, pool.k[layer], pool.v[layer], pool.tables[g], paged, scale,
                                          self.backend, tiles=ctx.prefill_tiles, lse=lse)
        out = torch.empty_like(q) if out is None else out
        for seg in split:
            slots = pool.tables[g, seg.row, : seg.context - seg.length].long()
            own = slice(seg.start, seg.start + seg.length)
            try:
                res = split_chunk_attention(q[own], pool.k[layer][slots], pool.v[layer][slots],
                                            k[own].to(q.dtype), v[own].to(q.dtype), scale, return_lse=lse is not None)
            except SplitUnavailable:
                if route == "split":
                    raise
                self.prefill_route, ctx.prefill_tiles = "paged", None              # no cuDNN here: paged from now on
                return self._prefill_attention(layer, g, q, k, v, scale, want_lse)
            if lse is None:
                out[own] = res
            else:
                out[own], lse[own] = res
        return out, lse

    def _decode(self, layer: int, g: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        ctx, pool = self.ctx, self.pool
        B = q.shape[0]
        Hkv = pool.num_kv_heads
        k, v = pool_view(pool.k[layer], B), pool_view(pool.v[layer], B)
        tables, lens = ctx.tables[g], ctx.lens[g]                                # [B, W], [B]
        if self.mask_family:
            method = self.method
            if method.is_observer(layer):
                return self._observe(layer, q, tables, lens, scale)
            if not method.is_full(layer) and ctx.selection is not None:
                sel = ctx.selection
                return sparse_decode_attention(q, k, v, sel.unsqueeze(1).expand(B, Hkv, sel.shape[1]), scale=scale,
                                               backend=self.backend)
        indices = tables.unsqueeze(1).expand(B, Hkv, tables.shape[1])
        return sparse_decode_attention(q, k, v, indices, num_indices=lens, scale=scale, backend=self.backend)

    def observation_scores(self, logits: torch.Tensor, lens: torch.Tensor) -> torch.Tensor | None:
        """OmniKV's decode scores ``[B, W]`` of an observation layer's ``logits [B, H, W]`` by the two Triton passes
        of :func:`~sparse_hf.kernels.omnikv_scores.range_softmax_max` where they run (a row's slot table is in
        position order: its candidates are the slots ``[sinks, lens - recent)``), else ``None``: the method then
        computes them with its torch specification (``decode_scores``)."""
        if not range_softmax_max_kernel_runs(logits, self.backend):
            return None
        c = self.method.config
        return range_softmax_max(logits, c.num_sink_tokens, lens.long() - c.num_recent_tokens)

    def _observe(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """OmniKV observation layer: full attention plus a new selection (``ctx.selection``, slot ids)."""
        pool = self.pool
        W = tables.shape[1]
        B = q.shape[0]
        out, logits = decode_attention_with_scores(q, pool_view(pool.k[layer], B), pool_view(pool.v[layer], B),
                                                   lengths=lens, scale=scale, backend=self.backend,
                                                   slots=tables)                       # K/V read in place
        valid = torch.arange(W, device=q.device).view(1, W) < lens.view(-1, 1)     # [B, W]
        selection = self.method.select_decode(logits, valid, lens, reduce_scores=self.reduce_scores,
                                              scores=self.observation_scores(logits, lens), in_order=True)
        if selection is None:
            self.ctx.selection = None
        else:
            idx, ok = selection                                                     # [B, K] table positions
            self.ctx.selection = torch.where(ok, tables.long().gather(1, idx.clamp(0, W - 1)), -1)
        return out
