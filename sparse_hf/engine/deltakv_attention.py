"""DeltaKV's attention and flushes in the engine, over a :class:`~.deltakv_store.DeltaKVPool`.

Prefill is plain causal attention over raw slots in every layer (nothing of a row is compressed before its prompt
ends, as on the HF path), or, for a prompt too long for that, layer by layer (:mod:`.deltakv_layerwise`: the same
tokens, each compressed layer flushed as soon as it is done). After a chunked step the completed prompts, and after
each decode step its rows, flush: a row whose group-1 buffer holds twice ``num_recent_tokens`` compresses its oldest
buffer tokens in every compressed layer (core :func:`~sparse_hf.deltakv.state.flush`) and returns their raw slots to
the pool.

A decode step (static shapes: :mod:`.deltakv_graphs` captures it on CUDA): the filter layers attend to every raw
token, read in place through the slot table; the observation layer's scores (OmniKV's :meth:`decode_scores`, by
position; on CUDA the two passes of :func:`~sparse_hf.kernels.omnikv_scores.range_softmax_max`) pick, per row, the
top ``num_top_tokens`` of the row's compressed tokens (all of them when the budget covers them), once per
observation layer with their RoPE tables; each compressed layer gathers its raw sinks + buffer into a step buffer
(one launch) beside which the core :func:`~sparse_hf.deltakv.state.rebuild_kv` writes the rebuilt tokens (fused
kernels: gather latents, ``up``, writeback), and attends to both (``sparse_decode_attention``). About 7 launches
per compressed layer and 8 per observation layer (``benchmarks/count_deltakv_launches.py`` counts them).

Models with a key norm (Qwen3): the compressor reads keys before ``k_norm``, which cannot be undone, so the model
hands each step's pre-norm keys to :meth:`DeltaKVAttention.store_pre_norm_keys` before its fused norm + RoPE
kernel; they are stored at the compressed layers' slots (``DeltaKVPool.pre_norm_k``) and a flush reads them where
other models invert RoPE. A rebuild applies ``k_norm`` and RoPE (as on the HF path).

Tensor parallelism: the compressor reads all KV heads' ``concat(K, V)``, so a flush all-gathers the ranks' heads
(every rank then holds the same latents, computed from the same input); a rebuild yields every head and a rank
keeps its own. The observation scores are all-reduced (max) before the pick, so every rank picks what TP=1 picks.
"""

from __future__ import annotations

import torch

from sparse_hf.kernels import decode_attention_with_scores, sparse_decode_attention
from sparse_hf.kernels.gather_slots import gather_kv_slots

from ..config import resolve_counts
from ..methods.selection import top_priority
from ..deltakv.rope import unrotate
from ..deltakv.state import flush, rebuild_kv
from .attention import PoolAttention, pool_view
from .deltakv_layerwise import LayerwisePlan, LayerwisePrefill
from .runner import DecodePlan, MixedPlan, ModelRunner, PrefillPlan

#: The pool group of the compressed layers (group 0: the filter layers).
COMPRESSED = 1
#: A flush compresses at most this many tokens per :func:`~sparse_hf.deltakv.state.flush` call (one call per block,
#: in order: the same latents, fathers and centers as one call, as the decode-time flushes rely on), so its own
#: intermediates (``concat(K, V)``, the fp32 inverse RoPE, the projection: ~7 KB a token for a 7B model) stay near
#: 0.5 GB whatever the prompt's length (a chunked or a layer-wise prompt's flush).
FLUSH_BLOCK = 65536


class DeltaKVAttention(PoolAttention):
    """:class:`~.attention.PoolAttention` whose decode step reads rebuilt tokens in the compressed layers.

    Args:
        pool: a :class:`~.deltakv_store.DeltaKVPool`; method: the core ``DeltaKV``; projections: the compressor's
        ``DeltaKVProjections``; rotary: the model's :class:`~.model.Rotary`; tp: a ``TPGroup`` or ``None``;
        k_norms: layer -> its per-head RMS key norm (Qwen3's ``k_norm``; a rebuild applies it before RoPE), for
        a model with one (the pool must then keep pre-norm keys).
    """

    def __init__(self, pool, method, projections, rotary, tp=None, k_norms: dict | None = None):
        super().__init__(pool, method, tp)
        self.projections, self.rotary = projections, rotary
        self.k_norms = dict(k_norms or {})
        if self.k_norms and not pool.pre_norm_k and pool.store.layers:
            raise ValueError("deltakv on a model with a key norm needs a pool that keeps pre-norm keys: "
                             "DeltaKVPool(..., pre_norm_keys=True) (see deltakv_store.keeps_pre_norm_keys)")
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.kv_heads = projections.kv_heads                                    # all ranks' heads
        self.heads = tp.shard(self.kv_heads) if self.tp is not None else slice(None)
        self._widths: dict[int, tuple[int, int]] = {}      # row -> (compressed count, rebuild width)
        self.begin_step([])

    def store_pre_norm_keys(self, layer: int, k: torch.Tensor) -> None:
        """Keep this step's pre-norm keys ``k [T, Hkv, D]`` of ``layer`` (the model calls it before its key norm)
        at the step's compressed-group slots, for a later flush; nothing for a filter layer or without a key norm.
        Device ops only (CUDA-graph safe)."""
        side = self.pool.pre_norm_k.get(layer)
        if side is not None:
            side[self.ctx.slot_mapping[COMPRESSED]] = k.to(side.dtype)

    def rope(self, like: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[B, k, D]`` at positions ``pos [B, k]`` (what :func:`rebuild_kv` takes)."""
        return self.rotary.cos[pos].to(like.dtype), self.rotary.sin[pos].to(like.dtype)

    # -- decode ---------------------------------------------------------------------------------------------
    def _decode(self, layer: int, g: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        if self.method.is_full(layer):
            if self.method.is_observer(layer):
                return self._observe(layer, q, self.ctx.tables[g], self.ctx.lens[g], scale)
            return super()._decode(layer, g, q, scale)            # full attention over the raw slots
        return self._decode_compressed(layer, g, q, scale)

    def _observe(self, layer, q, tables, lens, scale):
        """Full attention plus the per-position scores (``self.scores``) the compressed layers pick by. K/V are
        read in place through the row's slot table (no gathered copy of a 128K row's K/V)."""
        B = q.shape[0]
        keys, values = pool_view(self.pool.k[layer], B), pool_view(self.pool.v[layer], B)
        out, logits = decode_attention_with_scores(q, keys, values, lengths=lens, scale=scale, backend=self.backend,
                                                   slots=tables)
        scores = self.observation_scores(logits, lens)
        if scores is None:
            valid = torch.arange(tables.shape[1], device=q.device).view(1, -1) < lens.view(-1, 1)
            scores = self.method.decode_scores(logits, valid)                      # [B, W]
        if self.reduce_scores is not None:
            scores = self.reduce_scores(scores)
        self.scores = self.method.pool_scores(scores)
        self._picks = {}                                    # the layers after this one pick by the new scores
        return out

    def begin_step(self, rows: list[int]) -> None:
        """Start a decode step of ``rows`` before its new token is allocated (the runner calls it, outside any graph
        capture): the host-side layout the compressed layers share (``widths``: rebuild slots per row)."""
        self.rows = list(rows)
        self.widths = [self._rebuild_width(row, int(self.pool.lens[0, row]) + 1) for row in self.rows]
        raw = int(self.pool.lens[COMPRESSED, self.rows].max()) + 1 if self.rows and self.pool.num_groups > 1 else 0
        if raw > self.raw_width:
            raise RuntimeError(f"a deltakv row would hold {raw} raw tokens in its compressed layers, more than sinks "
                               f"+ 2 * num_recent_tokens = {self.raw_width} (a flush was skipped)")
        self.reset_caches()

    def _rebuild_width(self, row: int, length: int) -> int:
        """Rebuild slots of ``row`` at a step of ``length`` tokens (with the new one): its top ``num_top_tokens`` (a
        fraction of the length, or a count), at most its ``n`` compressed tokens. The width is kept while it still
        covers the budget (``min(n, top) <= width <= n``), else set for ``num_recent_tokens`` more tokens, so a
        fraction budget does not change the step's shapes at every step (the slots past the budget are masked on the
        device, see :meth:`_step_layout`). Host ints only, as the HF path's ``_scratch_width``."""
        n = self.pool.store.count(row)
        kept = self._widths.get(row)
        if kept is not None and kept[0] == n and min(n, self.method.top_count(length, prefill=False)) <= kept[1]:
            return kept[1]
        width = min(n, self.method.top_count(length + self.method.config.num_recent_tokens, prefill=False))
        self._widths[row] = (n, width)
        return width

    def reset_caches(self) -> None:
        """Forget what the layers of one forward share (scores, picks, layout): a captured graph recomputes them."""
        self.scores, self._picks, self._layout = None, {}, None

    @property
    def raw_width(self) -> int:
        """Raw slots a row holds at most in the compressed layers during a decode step: its sinks and a buffer that
        flushes once it holds ``2 * num_recent_tokens`` (a static width, so a decode step has static shapes)."""
        c = self.method.config
        return c.num_sink_tokens + 2 * c.num_recent_tokens

    def _pick(self, row: int, b: int, like: torch.Tensor):
        """``(pick [1, k], (cos, sin) [1, k, D])``: offsets of the row's compressed tokens to rebuild, best first by
        the observation scores (the first ``num_top_tokens`` are read), and RoPE at their positions. Every
        compressed layer of a row holds the same tokens at the same positions, so both are made once per
        observation layer and shared by the layers after it."""
        got = self._picks.get(row)
        if got is None:
            k, S, n = self.widths[b], self.pool.store.clustering.num_sink, self.pool.store.count(row)
            # compressed offset j holds position S + j (a flush takes the oldest buffer tokens), and the filter
            # layers' slot table is in position order: offset j's score is scores[b, S + j]
            # best first, ties to the earlier token: the HF path's rule (DeltaKV.pick), which pooled scores need
            pick = top_priority(self.scores[b, S:S + n], k).view(1, k)
            got = self._picks[row] = (pick, self.rope(like, pick + S))
        return got

    def _step_layout(self, g: int, device):
        """``(W, flat [B * W], indices [B, Hkv, W + K])`` of this step, the same in every compressed layer.

        A compressed layer's step buffer is token-major ``[B * W + B * K, Hkv, D]`` (``W`` the static
        :attr:`raw_width`, or the step's slot-table width when that is narrower; ``K = max(widths)``): first every
        row's group-``g`` raw slots (sinks + buffer; slot ``flat[b * W + j]`` of the pool at ``b * W + j``, gathered
        in one launch), then row ``b``'s ``widths[b]`` rebuilt tokens at ``B * W + b * K + i``. ``indices`` lists,
        per row, its live raw entries and its rebuilt tokens within the budget (``-1`` elsewhere). Built from device
        tensors and host ints only (CUDA-graph safe)."""
        if self._layout is None:
            tables = self.ctx.tables[g, :, :self.raw_width]        # [B, W]: W < raw_width while all rows are short
            B, W = tables.shape
            K = max(self.widths, default=0)
            j = torch.arange(W + K, device=device).view(1, W + K)
            rows = torch.arange(B, device=device).view(B, 1)
            valid = j < self.ctx.lens[g].long().view(-1, 1)                        # the raw slots (lens <= W)
            top = resolve_counts(self.method.config.num_top_tokens, self.ctx.lens[0].long())   # [B], the budgets
            for b, k in enumerate(self.widths):                                      # the rebuilt tokens, best first
                valid[b, W:W + k] = j[0, :k] < top[b]
            at = torch.where(j < W, rows * W + j, B * W + rows * K + (j - W))
            indices = torch.where(valid, at, -1).unsqueeze(1).expand(B, self.pool.num_kv_heads, W + K)
            self._layout = (W, tables.reshape(-1).long(), indices)
        return self._layout

    def _decode_compressed(self, layer: int, g: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention over each row's raw sinks + buffer (group 1) and its rebuilt picked tokens, both in one
        token-major step buffer (see :meth:`_step_layout`; the rebuild writes into it in place, without tensor
        parallelism). Per layer: one gather of the raw K and V (:func:`gather_kv_slots`), then per row the rebuild's
        kernels."""
        pool, store = self.pool, self.pool.store
        W, flat, indices = self._step_layout(g, q.device)
        B, Hkv, L = indices.shape
        K = L - W
        k_pool, v_pool = pool.k[layer], pool.v[layer]
        keys = k_pool.new_empty(B * L, Hkv, k_pool.shape[-1])
        values = v_pool.new_empty(B * L, Hkv, v_pool.shape[-1])
        gather_kv_slots(k_pool, v_pool, flat, keys[:B * W], values[:B * W], backend=self.backend)
        for b, (row, k) in enumerate(zip(self.rows, self.widths)):
            if not k:
                continue
            state = store.state(row, layer)
            at = slice(B * W + b * K, B * W + b * K + k)
            slots = (keys[at].permute(1, 0, 2).unsqueeze(0), values[at].permute(1, 0, 2).unsqueeze(0))  # [1,Hkv,k,D]
            pick, cos_sin = self._pick(row, b, k_pool)
            kb, vb, _ = rebuild_kv(state, pick, self.projections, layer, self.kv_heads, pool.head_dim, self.rope,
                                   self.k_norms.get(layer), out=None if self.tp is not None else slots, cos_sin=cos_sin)
            if self.tp is not None:                           # every head rebuilt: this rank keeps its own
                slots[0].copy_(kb[:, self.heads])
                slots[1].copy_(vb[:, self.heads])
        return sparse_decode_attention(q, pool_view(keys, B), pool_view(values, B), indices, scale=scale,
                                       backend=self.backend)


class DeltaKVRunner(ModelRunner):
    """:class:`~.runner.ModelRunner` with DeltaKV's attention, and the flushes after each step."""

    def __init__(self, model, pool, method, projections, graphs=None, compute_logits: bool = True):
        super().__init__(model, pool, method, graphs, compute_logits)
        self.projections = projections
        k_norms = {i: layer.self_attn.k_norm for i, layer in enumerate(model.layers) if layer.self_attn.qk_norm}
        self.attention = DeltaKVAttention(pool, method, projections, model.rotary, getattr(model, "tp", None),
                                          k_norms)
        model.set_backend(self.attention)
        self.layerwise = LayerwisePrefill(self)

    def run(self, plan):
        if isinstance(plan, LayerwisePlan):      # one prompt, layer by layer (:mod:`.deltakv_layerwise`)
            return self.layerwise.run(plan)
        if isinstance(plan, MixedPlan):   # prompt chunks, then the decode rows: two forwards (each flushes after)
            first, second = self.prefill(plan.prefill), self.decode(plan.decode)
            if not self.compute_logits:
                return None
            return second if first is None else torch.cat([first, second])
        if not isinstance(plan, (PrefillPlan, DecodePlan)):
            raise NotImplementedError(f"deltakv runs prefill, decode and mixed steps, not {type(plan).__name__}")
        return super().run(plan)

    def prefill(self, plan):
        logits = super().prefill(plan)
        self.flush(plan.completing)
        return logits

    def decode(self, plan, device_ids=None):
        self.attention.begin_step(plan.rows)
        logits = super().decode(plan, device_ids)
        self.attention.begin_step([])
        self.flush(plan.rows)
        return logits

    # -- compression ----------------------------------------------------------------------------------------
    def _raw_x(self, layer: int, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE (and pre-norm) ``x = concat(K, V)`` of all KV heads of group-1 slots ``slots [m]`` at positions
        ``pos [m]``: ``[1, m, Dx]`` (see :meth:`compressor_input`)."""
        pool = self.pool
        side = pool.pre_norm_k.get(layer)
        keys = side[slots] if side is not None else pool.k[layer][slots]
        return self.compressor_input(keys, pool.v[layer][slots], pos, pre_norm=side is not None)

    def compressor_input(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, pre_norm: bool) -> torch.Tensor:
        """What the compressor reads of ``m`` tokens: ``[1, m, Dx]`` pre-RoPE (and pre-norm) ``concat(K, V)`` of all
        KV heads (under tensor parallelism the ranks' heads are gathered). ``k``, ``v``: ``[m, Hkv, D]`` as stored
        (``pre_norm``: ``k`` holds pre-norm keys, a key norm's model; else post-RoPE keys, whose RoPE at ``pos [m]``
        is inverted)."""
        m = k.shape[0]
        if pre_norm:
            k = k.reshape(m, -1)                                                   # [m, Hkv * D]
        else:
            post = k.float().transpose(0, 1).unsqueeze(0)                           # [1, Hkv, m, D]
            cos, sin = self.rotary_tables(pos)
            k = unrotate(post, cos, sin)[0].transpose(0, 1).reshape(m, -1)        # [m, Hkv * D]
        v = v.reshape(m, -1)
        k, v = k.to(v.dtype), v
        tp = self.attention.tp
        if tp is not None:
            k, v = all_gather_columns(k, tp), all_gather_columns(v, tp)
        return torch.cat([k, v], -1).unsqueeze(0)

    @torch.inference_mode()
    def compress_layer(self, row: int, layer: int, x: torch.Tensor, pos: torch.Tensor, count: int,
                       first: bool) -> None:
        """Compress ``row``'s ``count`` oldest buffer tokens of ``layer`` (core :func:`~sparse_hf.deltakv.state.flush`).
        ``x [1, m, Dx]`` / ``pos [m]``: the row's sinks then those tokens when it is the row's ``first`` flush (its
        sinks become centers), else those tokens only.

        Always in inference mode: a layer-wise prefill compresses inside it (its states' tensors are then inference
        tensors), and a later flush writing into them in place (offloaded latents) outside it would raise."""
        S = self.pool.store.clustering.num_sink
        lo = 0 if first else S
        at = pos.view(1, -1)
        sinks = (x[:, :S], at[:, :S]) if first else None
        flush(self.pool.store.state(row, layer), x[:, S - lo:], at[:, S - lo:], [count], self.projections, layer,
              sinks)

    def compress_in_blocks(self, row: int, layer: int, count: int, first: bool, read) -> None:
        """Compress ``row``'s ``count`` oldest buffer tokens of ``layer`` in blocks of :data:`FLUSH_BLOCK` tokens.
        ``read(start, stop)`` returns ``(x [1, m, Dx], pos [m])`` of the row's table entries ``start .. stop - 1``
        (:meth:`compressor_input`); the row's ``first`` flush reads its sinks with the first block (they become
        centers)."""
        S = self.pool.store.clustering.num_sink
        for lo in range(0, count, FLUSH_BLOCK):
            hi = min(count, lo + FLUSH_BLOCK)
            with_sinks = first and lo == 0
            x, pos = read(0 if with_sinks else S + lo, S + hi)
            self.compress_layer(row, layer, x, pos, hi - lo, with_sinks)

    def rotary_tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(cos, sin)`` ``[1, m, D]`` at positions ``pos [m]``."""
        rotary = self.model.rotary
        return rotary.cos[pos].unsqueeze(0).float(), rotary.sin[pos].unsqueeze(0).float()

    def flush(self, rows: list[int]) -> None:
        """Compress, in every compressed layer, the oldest buffer tokens of each of ``rows`` whose buffer holds twice
        ``num_recent_tokens`` (:meth:`DeltaKV.flush_count`, the HF path's rule), and free their raw slots."""
        pool, store = self.pool, self.pool.store
        S = store.clustering.num_sink
        if not store.layers:                         # every layer a filter layer: nothing to compress
            return
        for row in rows:
            n = int(pool.lens[COMPRESSED, row])
            count = self.method.flush_count(max(0, n - S))
            if not count:
                continue
            first = store.count(row) == 0            # a row's first flush also records its sinks as centers
            slots = pool.tables[COMPRESSED, row, :S + count].long()
            pos = torch.tensor(pool.raw_positions(row, 0, S + count), device=self.device)   # before any compress

            def read(start, stop, layer):
                return self._raw_x(layer, slots[start:stop], pos[start:stop]), pos[start:stop]

            for layer in store.layers:
                self.compress_in_blocks(row, layer, count, first, lambda a, b, layer=layer: read(a, b, layer))
            keep = torch.cat([torch.arange(S), torch.arange(S + count, n)]).to(self.device)
            pool.keep(COMPRESSED, row, keep.view(1, -1).expand(pool.num_kv_heads, -1))
            store.version += 1


def all_gather_columns(x: torch.Tensor, tp) -> torch.Tensor:
    """``[m, c]`` on each rank -> ``[m, size * c]``: the ranks' columns side by side, in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.data_group)
    return torch.cat(parts, -1)
