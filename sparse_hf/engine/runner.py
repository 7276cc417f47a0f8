"""One forward step: a prefill step (chunks of one or more requests), a decode step (one token per row), or a mixed
step (prompt chunks and decode rows together).

The runner turns scheduled requests into packed tensors and a :class:`~.attention.StepContext`, runs the model,
and applies the eviction methods to the pool after the step: layer ``l``'s eviction only changes what layer ``l``
reads at *later* steps, so running it after the whole forward equals running it right after layer ``l``'s
attention (as the HF path does), and keeps the forward free of host syncs (CUDA graphs).

A step is first described by a plan (:class:`PrefillPlan`, :class:`DecodePlan`, :class:`MixedPlan`: plain ints, no
requests, no tensors) and then run. Under tensor parallelism rank 0 builds the plan from its scheduled requests and
sends it to the other ranks, and every rank runs the same plan on its own heads and pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attention import PoolAttention, Segment, StepContext
from .decode_inputs import DecodeInputs


@dataclass
class PrefillPlan:
    """Prompt chunks of one step: ``ids``/``positions`` of the packed tokens, ``segments`` ``[(row, start, length,
    context)]`` (see :class:`~.attention.Segment`), and for each row whose prompt completes in this step its
    ``completing`` row and the index ``last`` of its last token in the packed batch."""

    ids: list
    positions: list
    segments: list
    completing: list
    last: list


@dataclass
class DecodePlan:
    """One token for each of ``rows``: token ``ids`` at ``positions``."""

    rows: list
    ids: list
    positions: list


@dataclass
class DecodeRows:
    """A step's decode rows on the device, for a decode eviction that must not sync: ``slots`` ``[G, B]`` their new
    tokens' slots, ``rows`` ``[B]`` long, ``positions`` ``[B]`` long the new tokens' positions, ``lens`` ``[G, B]``
    int32 the rows' slot counts with the new token."""

    slots: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    lens: torch.Tensor


@dataclass
class MixedPlan:
    """Prompt chunks (packed first) and decode rows (one token each, packed after them) in one step."""

    prefill: PrefillPlan
    decode: DecodePlan


def plan_mixed(chunks: list, decoding: list) -> MixedPlan:
    """The plan of a mixed step: prompt chunks ``[(request, n_tokens), ...]`` and decoding requests."""
    return MixedPlan(plan_prefill(chunks), plan_decode(decoding))


def plan_prefill(chunks: list) -> PrefillPlan:
    """The plan of prompt chunks ``[(request, n_tokens), ...]`` (each request's row set)."""
    plan = PrefillPlan([], [], [], [], [])
    start = 0
    for req, n in chunks:
        first = req.num_computed
        plan.ids.extend(req.token(p) for p in range(first, first + n))
        plan.positions.extend(range(first, first + n))
        plan.segments.append((req.row, start, n, first + n))
        start += n
        if first + n == req.prefill_end:
            plan.completing.append(req.row)
            plan.last.append(start - 1)
    return plan


def plan_decode(requests: list) -> DecodePlan:
    """The plan of a decode step: each request's first token without K/V, at its position. That is the newest
    token (``num_tokens - 1`` computed), or for a replaying request an already generated one (a forced input:
    :class:`~.request.Request`); either way the host knows it, so the plan, the CUDA-graph inputs and the other
    tensor-parallel ranks get it like any other step input."""
    return DecodePlan([r.row for r in requests], [r.token(r.num_computed) for r in requests],
                      [r.num_computed for r in requests])


class ModelRunner:
    """Owns the model, the pool and the attention backend, and runs plans.

    ``eviction_is_async``: the decode eviction never waits for the device (so a step may be launched before the
    previous one's tokens are read, :mod:`.decode_ahead`); ``False`` here (StreamingLLM's per-row plan reads a
    device flag), ``True`` for :class:`~.scored_pool.ScoredModelRunner`.

    Args:
        model: :class:`~.model.EngineModel` on ``device``; pool: :class:`~.kv_pool.KVPool`;
        method: the core sparse method or ``None``; graphs: a :class:`~.graphs.DecodeGraphs` or ``None``;
        compute_logits: ``False`` on tensor-parallel ranks other than 0 (they sample nothing).
    """

    eviction_is_async = False

    def __init__(self, model, pool, method=None, graphs=None, compute_logits: bool = True):
        self.model, self.pool, self.method = model, pool, method
        self.device = pool.device
        self.attention = PoolAttention(pool, method, getattr(model, "tp", None))
        model.set_backend(self.attention)
        self.evicts = method is not None and method.family == "evict"
        self.window = int(method.query_window) if self.evicts else 0
        self.graphs = graphs
        self.compute_logits = compute_logits
        #: Last prompt queries per row and layer (``[H, w, D]``) for methods scoring with an observation window;
        #: a row's entry restarts with its first chunk and is dropped once its prompt is evicted.
        self.query_windows: dict[int, dict[int, torch.Tensor]] = {}
        # All slots of a row are live: the methods' ``valid`` masks are views of this (no allocation per call).
        self._all_valid = torch.ones(1, pool.num_kv_heads, pool.max_len, dtype=torch.bool, device=self.device)
        #: Eager decode steps' inputs (a CUDA-graph step uses ``graphs.inputs``, the buffers its graphs read).
        self.inputs = DecodeInputs(pool.max_rows, pool.num_groups, pool.scratch_slot, self.device)

    def run(self, plan) -> torch.Tensor | None:
        if isinstance(plan, MixedPlan):
            return self.mixed(plan)
        return self.prefill(plan) if isinstance(plan, PrefillPlan) else self.decode(plan)

    # -- prefill --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, plan: PrefillPlan) -> torch.Tensor | None:
        """Run prompt chunks.

        Returns:
            ``[R, V]`` float32 logits at the last token of each row of ``plan.completing`` (in that order), or
            ``None`` if no prompt completes (or this rank computes no logits).
        """
        segments = [Segment(row, start, n, context) for row, start, n, context in plan.segments]
        slot_mapping = self.pool.allocate([seg.row for seg in segments], [seg.length for seg in segments])
        self.attention.ctx = StepContext(slot_mapping, segments, window=self.window)
        hidden = self.model(torch.tensor(plan.ids, device=self.device),
                            torch.tensor(plan.positions, device=self.device))
        self.attention.ctx = None
        self._finish_chunks(segments, plan)
        if not plan.completing or not self.compute_logits:
            return None
        return self.model.logits(hidden[torch.tensor(plan.last, device=self.device)])

    def _finish_chunks(self, segments: list[Segment], plan: PrefillPlan) -> None:
        """After a step with prompt chunks: remember their window queries; evict the prompts that completed."""
        if self.window:
            for seg in segments:
                self._remember_queries(seg)
        if self.evicts:
            for row in plan.completing:
                self._evict_prompt(row)

    # -- mixed --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def mixed(self, plan: MixedPlan) -> torch.Tensor | None:
        """Prompt chunks and decode rows in one eager forward (the decode rows read the pool through their slot
        tables as in an eager decode step).

        Returns:
            ``[R + B, V]`` float32 logits: the last token of each row of ``plan.prefill.completing`` (in that order),
            then each decode row (``None`` if this rank computes no logits).
        """
        pre, dec = plan.prefill, plan.decode
        pool = self.pool
        segments = [Segment(row, start, n, context) for row, start, n, context in pre.segments]
        T = sum(seg.length for seg in segments)
        slot_mapping = pool.allocate([seg.row for seg in segments] + dec.rows,
                                     [seg.length for seg in segments] + [1] * len(dec.rows))    # [G, T + B]
        lens_host = pool.lens[:, dec.rows]                                                     # [G, B]
        tables = pool.tables[:, torch.tensor(dec.rows, device=self.device), :int(lens_host.max())]
        lens = torch.as_tensor(lens_host.astype(np.int32)).to(self.device)
        self.attention.ctx = StepContext(slot_mapping, segments, tables=tables, lens=lens, window=self.window)
        hidden = self.model(torch.tensor(pre.ids + dec.ids, device=self.device),
                            torch.tensor(pre.positions + dec.positions, device=self.device))
        self.attention.ctx = None
        self._finish_chunks(segments, pre)
        if self.evicts and self.method.evicts_during_decode:
            self._evict_decode(dec.rows, DecodeRows(slot_mapping[:, T:], torch.tensor(dec.rows, device=self.device),
                                                    torch.tensor(dec.positions, device=self.device), lens))
        if not self.compute_logits:
            return None
        picks = pre.last + list(range(T, T + len(dec.rows)))
        return self.model.logits(hidden[torch.tensor(picks, device=self.device)])

    def _remember_queries(self, seg: Segment) -> None:
        if seg.context == seg.length:                    # the row's first chunk: a new prompt
            self.query_windows[seg.row] = {}
        windows = self.query_windows.setdefault(seg.row, {})
        for layer, q in seg.windows.items():
            prev = windows.get(layer)
            if prev is not None and q.shape[1] < self.window:
                q = torch.cat([prev, q], dim=1)
            windows[layer] = q[:, -self.window:]

    def _evict_prompt(self, row: int) -> None:
        """The method's ``prefill_keep`` on every layer of a completed prompt; kept tokens stay, the rest is freed."""
        pool, method = self.pool, self.method
        windows = self.query_windows.pop(row, {})
        for layer in range(pool.num_layers):
            g = pool.group_of[layer]
            n = int(pool.lens[g, row])
            slots = pool.tables[g, row, :n].long()
            keys = pool.k[layer][slots].permute(1, 0, 2).unsqueeze(0)              # [1, Hkv, n, D]
            valid = self._all_valid[:, :, :n]
            q = windows.get(layer)
            queries = q.unsqueeze(0) if q is not None else None                      # [1, H, W, D]
            qvalid = torch.ones(1, q.shape[1], dtype=torch.bool, device=self.device) if q is not None else None
            attn = self.model.layers[layer].self_attn
            self._apply(g, row, method.prefill_keep(layer, keys, valid, queries, qvalid, attn.scale,
                                                    reduce_heads=self.attention.reduce_heads))

    def _apply(self, group: int, row: int, plan) -> None:
        if plan is None:
            return
        idx, ok = plan
        if not bool(ok.all()):
            raise RuntimeError("the method kept a different number of tokens per KV head; the engine's pool "
                               "keeps one count per row")
        self.pool.keep(group, row, idx[0])

    # -- decode ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, plan: DecodePlan, device_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """One token for each row of the plan. Returns ``[B, V]`` float32 (``None`` if this rank computes no
        logits); with CUDA graphs a view of the graphs' output buffer, valid until the next decode step.

        Host work is kept off the GPU's path: the step's inputs go up in one pinned, non-blocking copy
        (:class:`~.decode_inputs.DecodeInputs`), slot allocation writes the tables from those device inputs, and
        nothing here waits for the GPU. ``device_ids``: ``[B]`` token ids already on the device, used instead of
        ``plan.ids`` (a step launched before the previous step's tokens reach the host, :mod:`.decode_ahead`)."""
        pool = self.pool
        rows = plan.rows
        B = len(rows)
        lens_before = pool.lens[:, rows]                                              # [G, B] host
        use_graph = self.graphs is not None and self.graphs.can_run(B)
        inputs = self.graphs.inputs if use_graph else self.inputs
        b = self.graphs.bucket(B) if use_graph else B
        inputs.stage(plan.ids, plan.positions, rows, lens_before, b)
        if device_ids is not None:
            inputs.ids[:B].copy_(device_ids)
        slots = pool.allocate_decode(rows, inputs.rows[:B], inputs.cols[:, :B])       # [G, B] int32
        width = int(lens_before.max()) + 1
        if use_graph:
            logits = self.graphs.run(B, slots, width)
        else:
            lens = inputs.lens[:, :B]
            tables = pool.tables[:, :, :width].index_select(1, inputs.rows[:B])       # [G, B, width]
            self.attention.ctx = StepContext(slots.long(), tables=tables, lens=lens)
            hidden = self.model(inputs.ids[:B], inputs.positions[:B])
            logits = self.model.logits(hidden) if self.compute_logits else None
            self.attention.ctx = None
        if self.evicts and self.method.evicts_during_decode:
            self._evict_decode(rows, DecodeRows(slots, inputs.rows[:B], inputs.positions[:B], inputs.lens[:, :B]))
        return logits if self.compute_logits else None

    def _evict_decode(self, rows: list[int], step: DecodeRows | None = None) -> None:
        """The method's ``decode_keep`` per row and layer (StreamingLLM's rolling window; ``step`` is not needed)."""
        pool = self.pool
        for row in rows:
            for layer in range(pool.num_layers):
                g = pool.group_of[layer]
                n = int(pool.lens[g, row])
                self._apply(g, row, self.method.decode_keep(layer, self._all_valid[:, :, :n]))
