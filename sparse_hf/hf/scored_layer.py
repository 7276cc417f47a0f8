"""``ScoredSlotLayer``: a :class:`SlotLayer` that also carries each slot's accumulated attention (H2O-style
methods, ``EvictionMethod.accumulates_attention``). The scores follow the slots through eviction and batch
reordering; the method computes them (``method.accumulate``) and decides from them."""

from __future__ import annotations

import torch

from .layer import SlotLayer


class ScoredSlotLayer(SlotLayer):
    """Attributes (beyond :class:`SlotLayer`'s):
        scores: ``[B, Hkv, n]`` accumulated attention mass of the live slots (``None`` before the first call).
        row_budget: ``[B]`` long, slots each row may hold during decode (set when the prompt is complete).
    """

    def __init__(self):
        super().__init__()
        self.scores = None
        self.row_budget = None

    def accumulate(self, method, query: torch.Tensor, key_valid: torch.Tensor, query_valid, scaling: float) -> None:
        """Add the attention mass of ``query`` (``[B, H, q, D]``, the layer's newest ``q`` columns) to the scores.

        ``key_valid``: ``[B, Hkv, n]`` bool, slots that are real tokens (padding excluded)."""
        q = query.shape[2]
        query_pos = torch.arange(self.seen - q, self.seen, device=query.device)
        mass = method.accumulate(query, self.keys, self.positions, key_valid, query_pos, query_valid, scaling)
        if self.scores is not None:
            old = self.scores
            mass[:, :, :old.shape[-1]] += old.to(mass.dtype)
        self.scores = mass

    def keep(self, idx: torch.Tensor, ok: torch.Tensor) -> None:
        if self.scores is not None:
            self.scores = self.scores.gather(-1, idx).masked_fill(~ok, 0.0)
        super().keep(idx, ok)

    def _index_batch(self, index: torch.Tensor) -> None:
        super()._index_batch(index)
        index = index.to(self.device) if self.scores is not None or self.row_budget is not None else index
        if self.scores is not None:
            self.scores = self.scores[index]
        if self.row_budget is not None:
            self.row_budget = self.row_budget[index]
