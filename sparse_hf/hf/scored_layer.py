"""``ScoredSlotLayer``: a :class:`SlotLayer` that also carries each slot's accumulated attention (H2O-style
methods, ``EvictionMethod.accumulates_attention``). The scores follow the slots through eviction and batch
reordering; the method computes them (``method.accumulate``) and decides from them.

The scores live in a buffer of the layer's capacity, like K/V and positions, so that a decode step (once the layer
is frozen) adds the new query's attention mass with static shapes over the whole buffer: that step can be captured
in a CUDA graph (:class:`~sparse_hf.hf.cuda_graph.GraphDecoder`) and replayed; eager decode runs the same code, so
both give the same scores and tokens."""

from __future__ import annotations

import torch

from .layer import SlotLayer


class ScoredSlotLayer(SlotLayer):
    """Attributes (beyond :class:`SlotLayer`'s):
        scores: ``[B, Hkv, n]`` accumulated attention mass of the live slots (a view of the ``[B, Hkv, capacity]``
            float32 buffer, zero past the live slots and in empty ones; ``None`` before the first call).
        row_budget: ``[B]`` long, slots each row may hold during decode (set when the prompt is complete).
        steady: host flag, ``True`` while every row and KV head holds exactly its ``row_budget`` tokens (slots in
            logical order), in decode mode: then a one-token decode step takes every row to ``budget + 1`` and
            :meth:`drop_one` evicts with no host sync. Set by the cache after a prompt or an eviction (steps that
            sync anyway), cleared by anything else that changes the layout (a prompt, a multi-token step, a batch
            reorder, a general :meth:`keep`).
    """

    def __init__(self):
        super().__init__()
        self._scores = None
        self.row_budget = None
        self.steady = False

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[2] != 1 or not self.frozen:       # a prompt (next turn) or a multi-token step
            self.steady = False
        return super().update(key_states, value_states, *args, **kwargs)

    @property
    def scores(self) -> torch.Tensor | None:
        return None if self._scores is None else self._scores[:, :, :self.num_slots]

    def buffer_signature(self) -> tuple:
        return super().buffer_signature() + (self._scores.data_ptr(),)

    def _ensure_capacity(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        super()._ensure_capacity(needed, like_k, like_v)
        if self._scores is None or self._scores.shape != self._pos.shape:    # new buffers: scores follow
            scores = torch.zeros(self._pos.shape, dtype=torch.float32, device=self._pos.device)
            if self._scores is not None:
                n = min(self._scores.shape[-1], scores.shape[-1])
                scores[:, :, :n] = self._scores[:, :, :n]
            self._scores = scores

    def accumulate(self, method, query: torch.Tensor, key_valid: torch.Tensor, query_valid, scaling: float,
                   lse: torch.Tensor | None = None) -> None:
        """Add the attention mass of ``query`` (``[B, H, q, D]``, the layer's newest ``q`` columns) to the scores.

        ``key_valid``: ``[B, Hkv, n]`` bool, slots that are real tokens (padding excluded). ``lse``: optional
        ``[B, H, q]`` log-sum-exp of each query from its attention (saves the mass its own pass over ``q.k``)."""
        q = query.shape[2]
        query_pos = torch.arange(self.seen - q, self.seen, device=query.device)
        mass = method.accumulate(query, self.keys, self.positions, key_valid, query_pos, query_valid, scaling,
                                 lse=lse)
        self._scores[:, :, :mass.shape[-1]] += mass.to(torch.float32)

    def accumulate_decode(self, method, query: torch.Tensor, scaling: float) -> None:
        """A frozen layer's decode step (``query`` ``[B, H, 1, D]``, its token already appended): the mass over the
        whole buffer (empty slots, ``position == -1``, get none) added in place, with static shapes and no host
        value (the query's column is the device-side counter): CUDA-graph safe."""
        k, _, pos = self.buffers
        query_pos = self.seen_dev - 1                                              # [1], this token's column
        self._scores += method.accumulate(query, k, pos, pos >= 0, query_pos, None, scaling).to(torch.float32)

    def drop_one(self, idx: torch.Tensor, found: torch.Tensor) -> None:
        """Evict slot ``idx`` (``[B, Hkv]`` long, where ``found``, ``[B, Hkv]`` bool) of every row and KV head and
        compact the rest to the front in slot order: exactly :meth:`keep` with the kept slots in increasing order and
        ``num_slots - 1`` slots (the layout the general decode eviction leaves). Static shapes, no host sync; only
        for a steady layer (every row then loses exactly one token, so ``num_slots - 1`` is known on the host)."""
        n = self.num_slots
        slot = torch.arange(n, device=idx.device)
        kept = self.valid() & ~((slot == idx.unsqueeze(-1)) & found.unsqueeze(-1))          # [B, Hkv, n]
        count = kept.sum(-1, keepdim=True)
        target = torch.where(kept, kept.long().cumsum(-1) - 1, n - 1)    # dropped/empty -> column n-1, cut below
        src = torch.zeros_like(target).scatter_(-1, target, slot.expand_as(target).contiguous())
        K = n - 1
        self.keep(src[:, :, :K], torch.arange(K, device=idx.device) < count)

    def keep(self, idx: torch.Tensor, ok: torch.Tensor) -> None:
        self.steady = False
        kept = self.scores.gather(-1, idx).masked_fill(~ok, 0.0) if self._scores is not None else None
        super().keep(idx, ok)
        if kept is None:
            return
        K = idx.shape[-1]
        if not self.frozen or self._scores.shape != self._pos.shape:
            self._scores = torch.zeros(self._pos.shape, dtype=torch.float32, device=self._pos.device)
        else:
            self._scores[:, :, K:] = 0.0                 # freed slots: the next token there starts from zero
        self._scores[:, :, :K] = kept

    def _index_batch(self, index: torch.Tensor) -> None:
        self.steady = False
        super()._index_batch(index)
        index = index.to(self.device) if self._scores is not None or self.row_budget is not None else index
        if self._scores is not None:
            self._scores = self._scores[index]
        if self.row_budget is not None:
            self.row_budget = self.row_budget[index]
