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
from .graphs import width_bucket


class DeltaKVGraphs:
    """The :class:`~.graphs.DecodeGraphs` interface (``can_run``, ``run``) for a
    :class:`~.deltakv_attention.DeltaKVRunner`: ``attention`` is its :class:`~.deltakv_attention.DeltaKVAttention`."""

    def __init__(self, model, pool, attention):
        self.model, self.pool, self.attention = model, pool, attention
        self.key = None
        self.graph = None
        self.buffers = None
        self.failed = False
        self.mempool = None
        self.captures = 0                  # how many graphs were captured (a test and a benchmark read it)

    def can_run(self, batch: int) -> bool:
        return not self.failed

    def _key(self, width: int) -> tuple:
        a = self.attention
        return tuple(a.rows), tuple(a.widths), self.pool.store.version, width_bucket(width, self.pool.max_len)

    def _forward(self) -> None:
        ids, positions, slot_mapping, rows, lens, logits, w = self.buffers
        a = self.attention
        a.reset_caches()                                   # recomputed inside the graph, never carried over
        tables = self.pool.tables[:, :, :w].index_select(1, rows)                     # [G, B, w]
        a.ctx = StepContext(slot_mapping, tables=tables, lens=lens)
        logits.copy_(self.model.logits(self.model(ids, positions)))
        a.ctx = None

    def _capture(self, key) -> None:
        """Warm up on the step's real inputs (it writes the same K/V the replay writes), then capture."""
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        self.graph = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool, stream=stream):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph, self.key = graph, key
        self.captures += 1

    def run(self, ids, positions, slot_mapping, rows, lens, width: int) -> torch.Tensor:
        """As :meth:`DecodeGraphs.run`: ``[B]``, ``[B]``, ``[G, B]``, ``[B]``, ``[G, B]`` inputs and the longest
        row's slot count -> ``[B, V]`` float32 logits."""
        key = self._key(width)
        if key != self.key:
            B = ids.shape[0]
            logits = torch.empty(B, self.model.config.vocab_size, dtype=torch.float32, device=ids.device)
            self.buffers = (ids.clone(), positions.clone(), slot_mapping.clone(), rows.clone(),
                            lens.contiguous().clone(), logits, key[-1])
            try:
                self._capture(key)
            except Exception as exc:                       # noqa: BLE001  (eager from now on, same outputs)
                warnings.warn(f"deltakv CUDA-graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly")
                self.failed, self.graph, self.key = True, None, None
                self._forward()                            # this step, eagerly
                return self.buffers[5].clone()
        else:
            for buffer, value in zip(self.buffers[:5], (ids, positions, slot_mapping, rows, lens)):
                buffer.copy_(value)
        self.graph.replay()
        return self.buffers[5].clone()
