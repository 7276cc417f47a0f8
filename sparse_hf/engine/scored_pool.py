"""Accumulated attention in the engine (H2O-style methods, ``EvictionMethod.accumulates_attention``).

- :class:`ScoredKVPool`: the :class:`~.kv_pool.KVPool` plus each slot's accumulated attention mass, per layer and
  KV head (``scores[l]`` ``[S + 1, Hkv]`` float32, indexed by slot id like ``k[l]``), zeroed when a slot is
  allocated and moved with its token when eviction compacts a row.
- :class:`ScoredPoolAttention`: the pool attention that also adds every query's attention mass to the scores of
  the row's slots: a prefill chunk through ``method.accumulate`` (causal, over the row's earlier slots and the
  chunk; on CUDA the Triton ``attention_mass`` reads the pool in place through the row's slot table), a decode
  token from the logits its attention returns anyway (``decode_attention_with_scores`` +
  ``method.accumulate_logits``).
- :class:`ScoredModelRunner`: at prompt end each layer keeps ``method.prefill_keep_scored`` and the row's budget
  (``method.row_budget``) is remembered; after every decode step the rows over their budget run
  ``method.decode_keep`` (one call per layer for all such rows), and the evicted slots go back to the pool.

The HF path's counterpart is :class:`sparse_hf.hf.scored_layer.ScoredSlotLayer`; both call the same method code.
Decode runs eagerly (no CUDA graphs): the eviction decides on the host which rows are over budget.
"""

from __future__ import annotations

import torch

from sparse_hf.kernels import decode_attention_with_scores

from .attention import PoolAttention, pool_view
from .kv_pool import KVPool
from .runner import ModelRunner


class ScoredKVPool(KVPool):
    """A :class:`~.kv_pool.KVPool` with ``scores[l]`` ``[S + 1, Hkv]`` float32 per layer (same arguments)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: ``[layers, S + 1, Hkv]`` float32; ``scores[l]`` is layer ``l``'s (slot-major, like ``k[l]``).
        self.scores = torch.zeros(self.num_layers, self.num_slots + 1, self.num_kv_heads, dtype=torch.float32,
                                  device=self.device)
        self._group_layers = torch.tensor(self.layers_of, device=self.device).view(self.num_groups, -1, 1)

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
            for buf in (self.k[layer], self.v[layer], self.scores[layer]):
                buf[dst, heads] = buf[src, heads]
        freed = [self.tables[group, r, c:m] for r, c, m in zip(rows, counts, n) if m > c]
        if freed:
            self._push_free(group, torch.cat(freed).clone())
        for r, c in zip(rows, counts):
            self.lens[group, r] = c


class ScoredPoolAttention(PoolAttention):
    """:class:`~.attention.PoolAttention` that also accumulates every query's attention mass into the pool's
    scores (the method must accumulate attention; the pool must be a :class:`ScoredKVPool`).

    ``mass_backend``: the backend of the prefill's mass kernel (default: the attention's own, Triton on CUDA); a
    benchmark sets ``"torch"`` to time the blocked matmul reference against it (fp32: the Triton kernel's exact
    dots run on the CUDA cores, ``benchmarks/profile_eval_batch.py --mass-backends``)."""

    def __init__(self, pool, method=None, tp=None):
        super().__init__(pool, method, tp)
        self.mass_backend = self.backend

    def _prefill(self, layer: int, g: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        out = super()._prefill(layer, g, q, k, v, scale)
        pool = self.pool
        Hkv = pool.num_kv_heads
        keys = pool_view(pool.k[layer], 1)                                             # [1, Hkv, S, D] in place
        for seg in self.ctx.segments:
            slots = pool.tables[g, seg.row: seg.row + 1, : seg.context]                 # [1, C] (none evicted yet)
            queries = q[seg.start: seg.start + seg.length].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            cols = torch.arange(seg.context, device=q.device)
            every = torch.ones((), dtype=torch.bool, device=q.device).expand(1, Hkv, seg.context)
            mass = self.method.accumulate(queries, keys, cols.expand(1, Hkv, -1), every,
                                          cols[seg.context - seg.length:], None, scale, backend=self.mass_backend,
                                          slots=slots)                                 # [1, Hkv, C]
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
        slots = torch.where(live, tables, pool.scratch_slot)
        pool.add_scores(layer, slots, mass.transpose(1, 2))                            # [B, W], [B, W, Hkv]
        return out


class ScoredModelRunner(ModelRunner):
    """:class:`~.runner.ModelRunner` for methods that accumulate attention (same arguments; ``pool`` a
    :class:`ScoredKVPool`). ``row_budget[row]``: slots each layer of the row may hold during decode, set when the
    row's prompt completes."""

    def __init__(self, model, pool, method, graphs=None, compute_logits: bool = True):
        if graphs is not None:
            raise ValueError(f"{method.name} re-scores every token at every decode step and decodes eagerly; "
                             "build it without CUDA graphs")
        super().__init__(model, pool, method, graphs=None, compute_logits=compute_logits)
        self.attention = ScoredPoolAttention(pool, method, getattr(model, "tp", None))
        model.set_backend(self.attention)
        self.row_budget: dict[int, int] = {}

    def _evict_prompt(self, row: int) -> None:
        pool, method = self.pool, self.method
        budget = None
        for layer in range(pool.num_layers):
            g = pool.group_of[layer]
            n = int(pool.lens[g, row])
            valid = self._all_valid[:, :, :n]
            if budget is None:
                budget = int(method.row_budget(valid)[0])
            scores = pool.row_scores(layer, pool.tables[g, row: row + 1, :n])            # [1, Hkv, n]
            self._apply(g, row, method.prefill_keep_scored(layer, valid, scores))
        self.row_budget[row] = budget

    def _evict_decode(self, rows: list[int]) -> None:
        """Per layer, the rows holding more than their budget keep ``method.decode_keep``'s choice."""
        pool, method = self.pool, self.method
        for layer in range(pool.num_layers):
            g = pool.group_of[layer]
            over = [r for r in rows if pool.lens[g, r] > self.row_budget[r]]
            if not over:
                continue
            counts = [int(pool.lens[g, r]) for r in over]
            width = max(counts)
            n = torch.tensor(counts, device=self.device)
            table = pool.tables[g, torch.tensor(over, device=self.device), :width]      # [R, width]
            valid = (torch.arange(width, device=self.device).view(1, 1, -1) < n.view(-1, 1, 1)).expand(
                -1, pool.num_kv_heads, -1)                                             # [R, Hkv, width]
            budgets = [self.row_budget[r] for r in over]
            plan = method.decode_keep(layer, valid, pool.row_scores(layer, table),
                                      torch.tensor(budgets, device=self.device))
            if plan is None:
                raise RuntimeError(f"{method.name} kept every token of rows over their budget (engine bug)")
            pool.keep_rows(g, over, plan[0], budgets)
