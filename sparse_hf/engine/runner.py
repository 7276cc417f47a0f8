"""One forward step: a prefill step (chunks of one or more requests) or a decode step (one token per row).

The runner turns scheduled requests into packed tensors and a :class:`~.attention.StepContext`, runs the model,
and applies the eviction methods to the pool after the step: layer ``l``'s eviction only changes what layer ``l``
reads at *later* steps, so running it after the whole forward equals running it right after layer ``l``'s
attention (as the HF path does), and keeps the forward free of host syncs (CUDA graphs).
"""

from __future__ import annotations

import numpy as np
import torch

from ..methods.base import SparseMethod
from .attention import PoolAttention, Segment, StepContext


class ModelRunner:
    """Owns the model, the pool and the attention backend.

    Args:
        model: :class:`~.model.EngineModel` on ``device``; pool: :class:`~.kv_pool.KVPool`;
        method: the core sparse method or ``None``; graphs: a :class:`~.graphs.DecodeGraphs` or ``None``.
    """

    def __init__(self, model, pool, method=None, graphs=None):
        self.model, self.pool, self.method = model, pool, method
        self.device = pool.device
        self.attention = PoolAttention(pool, method)
        model.set_backend(self.attention)
        self.evicts = method is not None and method.family == "evict"
        self.window = int(method.query_window) if self.evicts else 0
        self.graphs = graphs
        # All slots of a row are live: the methods' ``valid`` masks are views of this (no allocation per call).
        self._all_valid = torch.ones(1, pool.num_kv_heads, pool.max_len, dtype=torch.bool, device=self.device)

    # -- prefill --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list) -> torch.Tensor | None:
        """Run prompt chunks ``[(request, n_tokens), ...]``; each request's row must be set.

        Returns:
            ``[R, V]`` float32 logits at the last token of each request whose prompt completes in this step (in
            ``chunks`` order), or ``None`` if none does.
        """
        ids, positions, segments, last_rows, completing = [], [], [], [], []
        start = 0
        for req, n in chunks:
            first = req.num_computed
            ids.extend(req.token(p) for p in range(first, first + n))
            positions.extend(range(first, first + n))
            segments.append(Segment(req.row, start, n, first + n))
            start += n
            if first + n == req.num_tokens:
                last_rows.append(start - 1)
                completing.append(req)
        slot_mapping = self.pool.allocate([req.row for req, _ in chunks], [n for _, n in chunks])
        self.attention.ctx = StepContext(slot_mapping, segments, window=self.window)
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device))
        self.attention.ctx = None
        for (req, n), seg in zip(chunks, segments):
            req.num_computed += n
            if self.window:
                self._remember_queries(req, seg.windows)
        for req in completing:
            if self.evicts:
                self._evict_prompt(req)
            req.kept_kv_tokens = self.pool.row_tokens(req.row)
        if not completing:
            return None
        return self.model.logits(hidden[torch.tensor(last_rows, device=self.device)])

    def _remember_queries(self, req, windows: dict) -> None:
        for layer, q in windows.items():
            prev = req.query_windows.get(layer)
            if prev is not None and q.shape[1] < self.window:
                q = torch.cat([prev, q], dim=1)
            req.query_windows[layer] = q[:, -self.window:]

    def _evict_prompt(self, req) -> None:
        """The method's ``prefill_keep`` on every layer of a completed prompt; kept tokens stay, the rest is freed."""
        pool, method = self.pool, self.method
        for layer in range(pool.num_layers):
            g = pool.group_of[layer]
            n = int(pool.lens[g, req.row])
            slots = pool.tables[g, req.row, :n].long()
            keys = pool.k[layer][slots].permute(1, 0, 2).unsqueeze(0)              # [1, Hkv, n, D]
            valid = self._all_valid[:, :, :n]
            q = req.query_windows.get(layer)
            queries = q.unsqueeze(0) if q is not None else None                      # [1, H, W, D]
            qvalid = torch.ones(1, q.shape[1], dtype=torch.bool, device=self.device) if q is not None else None
            attn = self.model.layers[layer].self_attn
            self._apply(g, req.row, method.prefill_keep(layer, keys, valid, queries, qvalid, attn.scale))
        req.query_windows.clear()

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
    def decode(self, requests: list) -> torch.Tensor:
        """One token for each request (each holds ``num_tokens - 1`` computed tokens). Returns ``[B, V]`` float32."""
        pool = self.pool
        B = len(requests)
        rows = [r.row for r in requests]
        slot_mapping = pool.allocate(rows, [1] * B)                                  # [G, B]
        ids = torch.tensor([r.output_token_ids[-1] for r in requests], device=self.device)
        positions = torch.tensor([r.num_tokens - 1 for r in requests], device=self.device)
        lens_host = pool.lens[:, rows]                                               # [G, B]
        width = int(lens_host.max())
        if self.graphs is not None and self.graphs.can_run(B):
            logits = self.graphs.run(ids, positions, slot_mapping, torch.tensor(rows, device=self.device),
                                     torch.as_tensor(lens_host.astype(np.int32)).to(self.device), width)
        else:
            tables = pool.tables[:, torch.tensor(rows, device=self.device), :width]  # [G, B, width]
            lens = torch.as_tensor(lens_host.astype(np.int32)).to(self.device)
            self.attention.ctx = StepContext(slot_mapping, tables=tables, lens=lens)
            logits = self.model.logits(self.model(ids, positions))
            self.attention.ctx = None
        for r in requests:
            r.num_computed += 1
        if self.evicts and type(self.method).decode_keep is not SparseMethod.decode_keep:
            self._evict_decode(rows)
        for r in requests:
            r.kept_kv_tokens = pool.row_tokens(r.row)
        return logits

    def _evict_decode(self, rows: list[int]) -> None:
        """The method's ``decode_keep`` per row and layer (StreamingLLM's rolling window)."""
        pool = self.pool
        for row in rows:
            for layer in range(pool.num_layers):
                g = pool.group_of[layer]
                n = int(pool.lens[g, row])
                self._apply(g, row, self.method.decode_keep(layer, self._all_valid[:, :, :n]))
