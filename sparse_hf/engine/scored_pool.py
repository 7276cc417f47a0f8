"""Accumulated attention in the engine (H2O-style methods, ``EvictionMethod.accumulates_attention``).

- :class:`ScoredKVPool`: the :class:`~.kv_pool.KVPool` plus each slot's accumulated attention mass, per layer and
  KV head (``scores[l]`` ``[S + 1, Hkv]`` float32, indexed by slot id like ``k[l]``), zeroed when a slot is
  allocated and moved with its token when eviction compacts a row.
- :class:`ScoredPoolAttention`: the pool attention that also adds every query's attention mass to the scores of
  the row's slots: a prefill chunk through ``method.accumulate`` (causal, over the row's earlier slots and the
  chunk; on CUDA the Triton ``attention_mass`` reads the pool in place through the row's slot table) from the
  log-sum-exp each query's prefill attention returned (one pass over ``q.k`` beside the attention), a decode
  token from the logits its attention returns anyway (``decode_attention_with_scores`` +
  ``method.accumulate_logits``).
- :class:`ScoredModelRunner`: at prompt end each layer keeps ``method.prefill_keep_scored`` and the row's budget
  (``method.row_budget``) is remembered. After every decode step a row over its budget holds exactly ``budget + 1``
  tokens per layer and drops one (``method.decode_evict_one``: the lowest-scored middle token, one ``argmin``): in
  every layer and KV head at once, the newest token's K/V, score and position move into the dropped token's slot
  and the newest token's slot goes back to the free stack. Static shapes, a fixed number of launches whatever the
  number of layers, no host-device sync (which rows are over is known on the host), so the decode forward is
  captured in CUDA graphs like the other methods' and the eviction runs right after the replay.

A row's slots are in logical order after its prompt, but the decode eviction puts the newest token wherever a token
left; so the pool keeps each slot's logical position per layer and KV head (``pos``), which is what the eviction
rule orders by (sinks, recent tokens, ties).

The HF path's counterpart is :class:`sparse_hf.hf.scored_layer.ScoredSlotLayer`; both call the same method code.
"""

from __future__ import annotations

import numpy as np
import torch

from sparse_hf.kernels import decode_attention_with_scores
from sparse_hf.kernels.evict_one import evict_one_runs, evict_one_slots

from .attention import PoolAttention, pool_view
from .kv_pool import KVPool
from .runner import DecodeRows, ModelRunner


class ScoredKVPool(KVPool):
    """A :class:`~.kv_pool.KVPool` with ``scores[l]`` ``[S + 1, Hkv]`` float32 and ``pos[l]`` ``[S + 1, Hkv]`` int32
    per layer (same arguments; every group the same size). ``k[l]``/``v[l]`` are views of one ``[layers, S + 1, Hkv,
    D]`` tensor each (``k_all``, ``v_all``), so that the decode eviction moves tokens of every layer in one op."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: ``[layers, S + 1, Hkv]`` float32; ``scores[l]`` is layer ``l``'s (slot-major, like ``k[l]``).
        self.scores = torch.zeros(self.num_layers, self.num_slots + 1, self.num_kv_heads, dtype=torch.float32,
                                  device=self.device)
        #: ``[layers, S + 1, Hkv]`` int32, the logical position of the token each slot holds per KV head (set at the
        #: prompt's end and for every decode token; the decode eviction orders by it).
        self.pos = torch.zeros(self.num_layers, self.num_slots + 1, self.num_kv_heads, dtype=torch.int32,
                               device=self.device)
        self._group_layers = torch.tensor(self.layers_of, device=self.device).view(self.num_groups, -1, 1)
        self._layer_index = torch.arange(self.num_layers, device=self.device).view(-1, 1)         # [L, 1]

    def _kv_tensors(self, sizes, num_kv_heads, head_dim, dtype, device):
        if len(set(sizes)) != 1:
            raise ValueError(f"ScoredKVPool needs groups of one size, got slots {sorted(set(sizes))}")
        self.k_all = torch.zeros(len(sizes), sizes[0], num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v_all = torch.zeros_like(self.k_all)
        return list(self.k_all.unbind(0)), list(self.v_all.unbind(0))

    def _pop_free(self, n: int) -> torch.Tensor:
        """:meth:`KVPool._pop_free` (every allocation, prefill or decode, takes its slots here), and the new slots
        start with no attention: a reused slot must not inherit the scores of the token that held it before."""
        slots = super()._pop_free(n)                                                            # [G, n] int32
        self.scores[self._group_layers, slots.long().unsqueeze(1)] = 0.0                      # every layer at once
        return slots

    def add_scores(self, layer: int, slots: torch.Tensor, mass: torch.Tensor) -> None:
        """``scores[layer][slots[i]] += mass[i]`` (``slots`` ``[...]`` long, ``mass`` ``[..., Hkv]``, any strides: the
        decode step passes ``[B, W]`` and a transposed ``[B, W, Hkv]`` view, no copy). The live slots of
        one step are distinct (a slot holds one token of one row); entries without a token may all point at
        :attr:`scratch_slot`, whose score is garbage. So a gather, an add and a scatter do it: no
        ``index_put_(accumulate=True)``, which sorts the ``N`` indices on CUDA (``N`` = every slot of every decoding
        row, per layer and step)."""
        scores = self.scores[layer]
        scores[slots] = scores[slots] + mass.to(torch.float32)

    def row_scores(self, layer: int, table: torch.Tensor) -> torch.Tensor:
        """``table`` ``[R, L]`` slot ids -> their scores ``[R, Hkv, L]``."""
        return self.scores[layer][table.long()].permute(0, 2, 1)

    def keep(self, group: int, row: int, idx: torch.Tensor) -> None:
        self.keep_rows(group, [row], idx.unsqueeze(0), [idx.shape[-1]])

    def keep_rows(self, group: int, rows: list[int], idx: torch.Tensor, counts: list[int]) -> None:
        """Row ``rows[i]`` keeps, per KV head, its tokens at table positions ``idx[i, :, :counts[i]]`` (``idx``
        ``[R, Hkv, K]`` long, increasing along ``K`` up to ``counts[i]``; entries past it are ignored). The kept
        K/V and scores move to the row's first ``counts[i]`` slots in every layer of ``group``; the rest is freed.
        One gather and one scatter per layer and tensor for all rows."""
        R, Hkv, K = idx.shape
        n = [int(self.lens[group, r]) for r in rows]
        if any(c > m for c, m in zip(counts, n)):
            raise RuntimeError(f"keep_rows: rows {rows} hold {n} slots but would keep {counts} (engine bug)")
        width = max(n)
        table = self.tables[group, torch.tensor(rows, device=self.device), :width].long()        # [R, width]
        src = table.unsqueeze(1).expand(R, Hkv, width).gather(-1, idx.clamp(0, width - 1))     # [R, Hkv, K]
        kept = torch.arange(K, device=self.device).view(1, K) < torch.tensor(counts, device=self.device).view(R, 1)
        dst = torch.where(kept, table[:, :K], self.scratch_slot)                                  # K <= width
        dst = dst.unsqueeze(1).expand(R, Hkv, K)
        heads = torch.arange(Hkv, device=self.device).view(1, Hkv, 1)
        for layer in self.layers_of[group]:
            for buf in (self.k[layer], self.v[layer], self.scores[layer], self.pos[layer]):
                buf[dst, heads] = buf[src, heads]
        freed = [self.tables[group, r, c:m] for r, c, m in zip(rows, counts, n) if m > c]
        if freed:
            self._push_free(group, torch.cat(freed).clone())
        for r, c in zip(rows, counts):
            self.lens[group, r] = c

    def set_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """``pos[l][slots[group_of[l], i], :] = positions[i]`` for every layer (one op): ``slots`` ``[G, T]``,
        ``positions`` ``[T]`` (device)."""
        slots = slots.long()
        if self.num_groups != self.num_layers:
            slots = slots[self.group_of]
        self.pos[self._layer_index, slots] = positions.to(torch.int32).view(1, -1, 1)

    def evict_one(self, method, tables: torch.Tensor, lens: torch.Tensor, newest: torch.Tensor,
                  over: torch.Tensor, backend: str = "torch") -> torch.Tensor | None:
        """Rows ``over`` drop one token per layer and KV head (``method.decode_evict_one``): the newest token (table
        column ``lens - 1``) takes the dropped token's slot, K, V, score and position move with it. Every layer at
        once; static shapes, no host sync. Where ``backend`` gives Triton, one launch of
        :func:`~sparse_hf.kernels.evict_one.evict_one_slots` (the same rule and move; ``score_normalization="sum"``
        only); else the torch ops below.

        Args:
            tables: ``[L, B, W]`` the rows' slot tables per layer (``W >= lens``); lens: ``[L, B]`` their counts, the
                new token included; newest: ``[B]`` the new tokens' positions; over: ``[B]`` bool, rows to evict in.

        Returns:
            torch path: ``[L, B, Hkv]`` long, the table column each layer and head dropped (for tests); Triton:
            ``None``. The caller frees the new tokens' slots of the ``over`` rows with :meth:`push_decode_slots`.
        """
        c = method.config
        # The Triton kernel ranks by the raw sum; another score_normalization takes the torch path (the method's rule).
        if getattr(c, "score_normalization", "sum") == "sum" and evict_one_runs(backend, self.k_all):
            evict_one_slots(self.k_all, self.v_all, self.scores, self.pos, tables, lens, newest, over,
                            c.num_sink_tokens, c.num_recent_tokens)
            return None
        L, B, W = tables.shape
        t = tables.long()
        layers = torch.arange(L, device=self.device).view(L, 1, 1)
        scores = self.scores[layers, t].transpose(2, 3)                                   # [L, B, Hkv, W]
        pos = self.pos[layers, t].transpose(2, 3)
        lens = lens.long()
        live = (torch.arange(W, device=self.device).view(1, 1, W) < lens.unsqueeze(-1)).unsqueeze(2)
        col, _ = method.decode_evict_one(scores, pos, newest.view(1, B, 1, 1), live)     # [L, B, Hkv]
        src = t.gather(2, (lens - 1).clamp_min(0).unsqueeze(-1))                           # [L, B, 1] newest's slot
        dst = torch.where(over.view(1, B, 1), t.gather(2, col), self.scratch_slot)        # [L, B, Hkv]
        src = src.expand_as(dst)
        heads = torch.arange(self.num_kv_heads, device=self.device).view(1, 1, -1)
        for buf in (self.k_all, self.v_all, self.scores, self.pos):
            buf[layers, dst, heads] = buf[layers, src, heads]
        return col

    def push_decode_slots(self, slots: torch.Tensor, over: torch.Tensor, count: int) -> None:
        """Give back the slots ``slots[:, i]`` (``[G, B]`` device, this step's new tokens) of the ``count`` rows with
        ``over[i]`` (``[B]`` bool, device): the over rows' slots first (a stable sort of the mask), copied above each
        free stack's top, whose top then rises by ``count``. No host sync: the host knows ``count``."""
        if count == 0:
            return
        B = slots.shape[1]
        order = (~over).to(torch.int8).argsort(stable=True)
        back = slots.to(self.free.dtype).index_select(1, order)                          # [G, B]
        tops = self.free_top
        if all(t == tops[0] for t in tops):
            self.free[:, tops[0]: tops[0] + B] = back
        else:
            for g, t in enumerate(tops):
                self.free[g, t: t + B] = back[g]
        self.free_top = [t + count for t in tops]


class ScoredPoolAttention(PoolAttention):
    """:class:`~.attention.PoolAttention` that also accumulates every query's attention mass into the pool's
    scores (the method must accumulate attention; the pool must be a :class:`ScoredKVPool`).

    ``mass_backend``: the backend of the prefill's mass kernel (default: the attention's own; ``"auto"`` on CUDA is
    Triton in fp16/bf16 and the blocked matmul reference in fp32, where the kernel's exact dots run on the CUDA cores:
    :func:`~sparse_hf.kernels.attention_mass.mass_runs_triton`); a benchmark sets it to time one against the other
    (``benchmarks/profile_eval_batch.py --mass-backends``)."""

    def __init__(self, pool, method=None, tp=None):
        super().__init__(pool, method, tp)
        self.mass_backend = self.backend

    def _prefill(self, layer: int, g: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """The chunks' attention, then each chunk's mass from the log-sum-exp that attention returned (``[T, H]``;
        where its route gives none, the mass kernel computes it: a second pass over ``q.k``)."""
        out, lse = self._prefill_attention(layer, g, q, k, v, scale, want_lse=True)
        pool = self.pool
        Hkv = pool.num_kv_heads
        keys = pool_view(pool.k[layer], 1)                                             # [1, Hkv, S, D] in place
        for seg in self.ctx.segments:
            slots = pool.tables[g, seg.row: seg.row + 1, : seg.context]                 # [1, C] (none evicted yet)
            queries = q[seg.start: seg.start + seg.length].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            cols = torch.arange(seg.context, device=q.device)
            every = torch.ones((), dtype=torch.bool, device=q.device).expand(1, Hkv, seg.context)
            seg_lse = None if lse is None else lse[seg.start: seg.start + seg.length].T.unsqueeze(0)  # [1, H, n]
            mass = self.method.accumulate(queries, keys, cols.expand(1, Hkv, -1), every,
                                          cols[seg.context - seg.length:], None, scale, backend=self.mass_backend,
                                          slots=slots, lse=seg_lse)                    # [1, Hkv, C]
            pool.add_scores(layer, slots[0].long(), mass[0].T)
        return out

    def _decode(self, layer: int, g: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        ctx, pool = self.ctx, self.pool
        tables, lens = ctx.tables[g].long(), ctx.lens[g]                                # [B, W], [B]
        B = q.shape[0]
        out, logits = decode_attention_with_scores(q, pool_view(pool.k[layer], B), pool_view(pool.v[layer], B),
                                                   lengths=lens, scale=scale, backend=self.backend,
                                                   slots=tables)                       # K/V read in place
        mass = self.method.accumulate_logits(logits, pool.num_kv_heads, backend=self.backend)  # [B, Hkv, W]
        live = torch.arange(tables.shape[1], device=q.device).view(1, -1) < lens.view(-1, 1)
        if self.warm_up:                  # a graph's warm-up: the replay adds this step's mass, not this run
            live = torch.zeros_like(live)
        slots = torch.where(live, tables, pool.scratch_slot)
        pool.add_scores(layer, slots, mass.transpose(1, 2))                            # [B, W], [B, W, Hkv]
        return out


class ScoredModelRunner(ModelRunner):
    """:class:`~.runner.ModelRunner` for methods that accumulate attention (same arguments; ``pool`` a
    :class:`ScoredKVPool`). ``row_budget[row]``: slots each layer of the row may hold during decode, set when the
    row's prompt completes (``budget_dev``: the same on the device)."""

    eviction_is_async = True

    def __init__(self, model, pool, method, graphs=None, compute_logits: bool = True):
        super().__init__(model, pool, method, graphs=graphs, compute_logits=compute_logits)
        self.attention = ScoredPoolAttention(pool, method, getattr(model, "tp", None))
        model.set_backend(self.attention)
        self.row_budget: dict[int, int] = {}
        self.budget_dev = torch.zeros(pool.max_rows, dtype=torch.long, device=self.device)

    def _evict_prompt(self, row: int) -> None:
        pool, method = self.pool, self.method
        n = int(pool.lens[0, row])                     # the whole prompt in every layer (nothing evicted yet)
        cols = torch.arange(n, device=self.device)     # the prompt's positions: rows start at 0
        pool.set_positions(pool.tables[:, row, :n], cols)
        budget = None
        for layer in range(pool.num_layers):
            g = pool.group_of[layer]
            n = int(pool.lens[g, row])
            valid = self._all_valid[:, :, :n]
            if budget is None:
                budget = int(method.row_budget(valid)[0])
            scores = pool.row_scores(layer, pool.tables[g, row: row + 1, :n])            # [1, Hkv, n]
            self._apply(g, row, method.prefill_keep_scored(layer, valid, scores, positions=cols[:n].expand_as(valid)))
        self.row_budget[row] = budget
        self.budget_dev[row] = budget

    def _evict_decode(self, rows: list[int], step: DecodeRows | None = None) -> None:
        """After a decode step: each row over its budget drops one token per layer and KV head
        (:meth:`ScoredKVPool.evict_one`), and its new token's slot returns to the free stack. The host knows which
        rows are over (counts and budgets are host values); the device works it out alike, so nothing syncs."""
        pool = self.pool
        if step is None:
            raise RuntimeError(f"{self.method.name}: the decode eviction needs the step's device rows (engine bug)")
        pool.set_positions(step.slots, step.positions)
        held = pool.lens[:, rows]                                                      # [G, B] host
        budget = np.array([self.row_budget[r] for r in rows], dtype=np.int64)
        over_host = held[0] > budget
        count = int(over_host.sum())
        if not count:
            return
        if (held != held[0]).any() or (held[0] > budget + 1).any():
            raise RuntimeError(f"{self.method.name}: rows {rows} hold {held.tolist()} slots for budgets "
                               f"{budget.tolist()}; a decode step adds one token per row (engine bug)")
        width = int(held.max())
        tables = pool.tables[:, :, :width].index_select(1, step.rows)                  # [G, B, width]
        lens = step.lens
        if pool.num_groups != pool.num_layers:
            tables, lens = tables[pool.group_of], lens[pool.group_of]                   # [L, B, width], [L, B]
        over = lens[0].long() > self.budget_dev.index_select(0, step.rows)             # [B], = over_host
        pool.evict_one(self.method, tables, lens, step.positions, over, backend=self.attention.backend)
        pool.push_decode_slots(step.slots, over, count)
        over_rows = np.asarray(rows, dtype=np.int64)[over_host]
        pool.lens[:, over_rows] -= 1
