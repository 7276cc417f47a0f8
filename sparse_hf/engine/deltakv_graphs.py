"""CUDA-graph decode for DeltaKV in the engine.

A DeltaKV decode step has static shapes while nothing of its batch changes: the raw width of the compressed layers
is fixed (:attr:`DeltaKVAttention.raw_width`), each row rebuilds a fixed number of tokens (``widths``, host ints),
and the per-row compressed states keep their tensors between flushes. So a step is captured once and replayed
until its *key* changes: the rows, their widths, the store's version (every flush makes new state tensors) or the
slot-table width bucket. The graph reads the pool, the slot tables and the states in place; the step's inputs go
through static buffers, as :class:`~.graphs.DecodeGraphs` does. Only the latest graph is kept (a flush every
``num_recent_tokens`` steps per row makes old ones useless).

Should a capture fail, a warning says so and decode stays eager for the engine's life (the outputs are the same).
"""

from __future__ import annotations

import warnings

import torch

from .attention import StepContext
from .decode_inputs import DecodeInputs
from .graphs import capture_step, width_bucket


class DeltaKVGraphs:
    """The :class:`~.graphs.DecodeGraphs` interface (``inputs``, ``can_run``, ``bucket``, ``run``) for a
    :class:`~.deltakv_attention.DeltaKVRunner`: ``attention`` is its :class:`~.deltakv_attention.DeltaKVAttention`.
    A graph runs exactly the step's rows (no padding rows)."""

    def __init__(self, model, pool, attention):
        self.model, self.pool, self.attention = model, pool, attention
        self.inputs = DecodeInputs(pool.max_rows, pool.num_groups, pool.scratch_slot, pool.device)
        self.logits = torch.zeros(pool.max_rows, model.config.vocab_size, dtype=torch.float32, device=pool.device)
        self.key = None
        self.graph = None
        self.failed = False
        self.mempool = None
        self.captures = 0                  # how many graphs were captured (a test and a benchmark read it)

    def release(self) -> None:
        """Drop the captured graph and its memory pool (see :meth:`DecodeGraphs.release`)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.key, self.mempool = None, None, None
        self.model = self.pool = self.attention = None       # see DecodeGraphs.release

    def can_run(self, batch: int) -> bool:
        return not self.failed and batch <= self.inputs.max_rows

    def bucket(self, batch: int) -> int:
        return batch

    def _key(self, width: int) -> tuple:
        a = self.attention
        return tuple(a.rows), tuple(a.widths), self.pool.store.version, width_bucket(width, self.pool.max_len)

    def _forward(self, b: int, w: int) -> None:
        inp, a = self.inputs, self.attention
        a.reset_caches()                                   # recomputed inside the graph, never carried over
        tables = self.pool.tables[:, :, :w].index_select(1, inp.rows[:b])              # [G, b, w]
        a.ctx = StepContext(inp.slot_mapping[:, :b], tables=tables, lens=inp.lens[:, :b])
        self.model.logits(self.model(inp.ids[:b], inp.positions[:b]), out=self.logits[:b])
        a.ctx = None

    def _capture(self, key) -> None:
        """Warm up on the step's real inputs (it writes the same K/V the replay writes), then capture."""
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        self.graph = None
        b, w = len(key[0]), key[-1]
        self.graph, self.key = capture_step(lambda: self._forward(b, w), self.mempool), key
        self.captures += 1

    def run(self, batch: int, slots: torch.Tensor, width: int) -> torch.Tensor:
        """As :meth:`DecodeGraphs.run`: the step's inputs are staged in ``self.inputs``; ``slots`` ``[G, batch]``;
        ``width`` the longest row's slot count. Returns ``[batch, V]`` float32 logits (a view, valid until the next
        step)."""
        self.inputs.set_slots(slots, batch)
        key = self._key(width)
        if key != self.key:
            try:
                self._capture(key)
            except Exception as exc:                       # noqa: BLE001  (eager from now on, same outputs)
                warnings.warn(f"deltakv CUDA-graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly")
                self.failed, self.graph, self.key = True, None, None
                self._forward(batch, key[-1])              # this step, eagerly
                return self.logits[:batch]
        self.graph.replay()
        return self.logits[:batch]
