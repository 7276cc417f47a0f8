"""``DeltaKVLayer``: one compressed layer of DeltaKV's HF cache (see :mod:`sparse_hf.hf.deltakv_cache`).

Its slot buffers hold the raw tokens (each row's sinks and recent buffer, then ``scratch`` slots for the tokens a
decode step rebuilds); the compressed tokens live in a core :class:`~sparse_hf.deltakv.state.CompressedState`.
"""

from __future__ import annotations

import torch

from ..deltakv.state import CompressedState, all_offsets
from .layer import SlotLayer


class DeltaKVLayer(SlotLayer):
    """One compressed layer. Reuses ``SlotLayer``'s HF cache API; its slot buffers hold the raw tokens, then
    ``scratch`` slots for the compressed tokens a decode step rebuilds.

    Buffers ``_k``/``_v``/``_pos`` are ``[B, Hkv, capacity + scratch, D]``: raw slots first (``capacity`` of them),
    then the scratch slots, whose K/V and columns every static decode step rewrites (``-1``: none). One dense pass
    of the sparse decode kernel reads both (static shapes, no concatenation, CUDA-graph safe).

    Attributes:
        raw_kpre: ``[B, n, Hkv*D]`` pre-norm keys of the raw slots (``k_norm`` models only), else ``None``.
        raw_pos: ``[B, n]`` RoPE positions of the raw slots (views of ``[B, capacity]`` buffers).
        state: the compressed tokens (``None`` until the prompt is complete).
        pad: host list ``[B]``, padding columns per row (column = position + pad); ``col_offset`` the same ``[B, 1]``.
        scratch: host int, the scratch slots (the rebuild width of a decode step; fixed between flushes).
    """

    def __init__(self):
        super().__init__()
        self._raw_kpre = self._raw_pos = None
        self.scratch = 0
        self.static_ok = False     # whether the latest one-token decode step took the static path
        self.state: CompressedState | None = None
        self.pad: list[int] | None = None
        self.col_offset = None
        # per flush, not per step: [B, N] column of each compressed token (-1 / 0 where absent), absence, offsets
        self.comp_cols = self.comp_cols_safe = self.comp_absent = self.all_offsets = None
        self.state_version = 0     # + 1 whenever the compressed state or its column tables change (a flush)

    # -- raw slots and scratch slots in one buffer --------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Raw slots (the scratch slots after them are not room for new tokens)."""
        return 0 if self._k is None else self._k.shape[2] - self.scratch

    def _allocate(self, batch, kv_heads, head_dim, v_dim, capacity):
        return super()._allocate(batch, kv_heads, head_dim, v_dim, capacity + self.scratch)

    def set_scratch(self, width: int) -> None:
        """Re-size the scratch slots to ``width`` (new buffers, raw slots copied; eager, between decode steps)."""
        if width == self.scratch or self._k is None:
            return
        B, Hkv, _, D = self._k.shape
        cap, n = self.capacity, self.num_slots
        self.scratch = width
        k, v, pos = self._allocate(B, Hkv, D, self._v.shape[-1], cap)
        k[:, :, :n], v[:, :, :n], pos[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n], self._pos[:, :, :n]
        self._k, self._v, self._pos = k, v, pos
        self._refresh_views()
        if self.frozen:
            self.freeze()

    def buffer_signature(self) -> tuple:
        """``SlotLayer``'s, plus everything else a static decode step reads: the raw positions (and pre-norm keys),
        the per-flush column tables and the compressed state's tensors, with a version that every flush bumps. A
        flush re-allocates these without touching the slot buffers, so without them here a CUDA graph captured
        before a flush would be replayed after it on freed memory (an out-of-bounds gather on the H200)."""
        def describe(t):
            return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)

        tensors = [self._raw_pos, self._raw_kpre, self.col_offset, self.comp_cols, self.comp_cols_safe,
                   self.comp_absent]
        if self.state is not None:
            s = self.state
            tensors += [s.comp_pos, s.center_x, s.center_pos, s.fathers, *(s.latent or ())]
        return (super().buffer_signature(), self.scratch, self.state_version, *map(describe, tensors))

    def scratch_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``K [B, Hkv, scratch, D]``, ``V``, columns ``[B, Hkv, scratch]``: views of the scratch slots."""
        cap = self.capacity
        return self._k[:, :, cap:], self._v[:, :, cap:], self._pos[:, :, cap:]

    @property
    def raw_pos(self) -> torch.Tensor | None:
        return None if self._raw_pos is None else self._raw_pos[:, :self.num_slots]

    @property
    def raw_kpre(self) -> torch.Tensor | None:
        return None if self._raw_kpre is None else self._raw_kpre[:, :self.num_slots]

    def _raw_room(self, kpre: torch.Tensor | None, like: torch.Tensor) -> None:
        """Grow the raw position (and pre-norm key) buffers to the raw capacity (host shapes only)."""
        B, cap = like.shape[0], self.capacity
        if self._raw_pos is None or self._raw_pos.shape[1] < cap:
            new = torch.full((B, cap), -1, dtype=torch.int32, device=like.device)
            if self._raw_pos is not None:
                new[:, :self._raw_pos.shape[1]] = self._raw_pos
            self._raw_pos = new
        if kpre is not None and (self._raw_kpre is None or self._raw_kpre.shape[1] < cap):
            new = kpre.new_zeros(B, cap, kpre.shape[-1])
            if self._raw_kpre is not None:
                new[:, :self._raw_kpre.shape[1]] = self._raw_kpre
            self._raw_kpre = new

    def append_raw_k(self, kpre: torch.Tensor | None, pos: torch.Tensor) -> None:
        """Record the new raw tokens' positions and, when given (layers with ``k_norm``), their pre-norm keys; they
        sit in the last ``q`` raw slots (K/V were appended first). A one-token decode step writes at the device-side
        slot counter (no host value: CUDA-graph safe)."""
        B, q = pos.shape
        self._raw_room(kpre, pos)
        pos = pos.to(torch.int32)
        if self.frozen and q == 1:
            at = (self.n_dev - 1).view(1, 1).expand(B, 1)
            self._raw_pos.scatter_(1, at, pos)
            if kpre is not None:
                self._raw_kpre.scatter_(1, at.unsqueeze(-1).expand(B, 1, kpre.shape[-1]), kpre)
            return
        n = self.num_slots
        self._raw_pos[:, n - q:n] = pos
        if kpre is not None:
            self._raw_kpre[:, n - q:n] = kpre

    def keep_raw(self, idx: torch.Tensor, ok: torch.Tensor) -> None:
        """Keep raw slots ``idx [B, K]`` (``ok`` False: empty): K/V and columns, positions and pre-norm keys."""
        B, K = idx.shape
        pos = self.raw_pos.gather(1, idx)
        kpre = None if self._raw_kpre is None else self.raw_kpre.gather(
            1, idx.unsqueeze(-1).expand(B, K, self._raw_kpre.shape[-1]))
        Hkv = self._k.shape[1]
        self.keep(idx.unsqueeze(1).expand(B, Hkv, K), ok.unsqueeze(1).expand(B, Hkv, K))
        if not self.frozen:            # keep() re-allocated the slots: the raw buffers follow its new capacity
            self._raw_pos = self._raw_kpre = None
        self._raw_room(kpre, idx)
        self._raw_pos[:, :K] = pos
        if kpre is not None:
            self._raw_kpre[:, :K] = kpre

    def set_columns(self) -> None:
        """Refresh the per-flush views of the compressed tokens (their logical columns) used at every step."""
        self.state_version += 1
        self.all_offsets, valid = all_offsets(self.state)
        self.comp_absent = ~valid
        self.comp_cols = (self.state.comp_pos.long() + self.col_offset).masked_fill_(self.comp_absent, -1)
        self.comp_cols_safe = self.comp_cols.clamp(min=0)

    def compressed_per_row(self) -> list[int]:
        """Compressed tokens per row."""
        return list(self.state.counts) if self.state is not None else [0] * self.positions.shape[0]

    def allocated_bytes(self) -> int:
        return sum(self.bytes_by_part().values())

    def used_bytes(self) -> int:
        """Live raw slots plus everything beside them (latents, centers, ids, positions, scratch slots)."""
        return self.allocated_bytes() - SlotLayer.allocated_bytes(self) + super().used_bytes()

    def bytes_by_part(self) -> dict[str, int]:
        """Allocated bytes of this layer by part; :meth:`allocated_bytes` is their sum."""
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()

        scratch = sum(size(t) for t in self.scratch_views()) if self._k is not None else 0
        parts = {"raw K/V + slot positions (sinks + buffer)": SlotLayer.allocated_bytes(self) - scratch,
                 "scratch slots (the compressed tokens a decode step rebuilds)": scratch,
                 "raw pre-norm keys (Qwen3 buffer)": size(self._raw_kpre), "raw positions": size(self._raw_pos)}
        return {**parts, **(self.state.bytes_by_part() if self.state is not None else {})}

    def kept_per_row(self) -> list[int]:
        raw = (self.positions[:, 0] >= 0).sum(-1)
        return [r + n for r, n in zip(raw.tolist(), self.compressed_per_row())]

    def _index_batch(self, index):
        super()._index_batch(index)
        index = index.to(self.device)
        for name in ("_raw_kpre", "_raw_pos", "col_offset"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])
        if self.state is not None:
            # the host lists follow the index, read on the host only when rows differ (beams share a row's)
            same = len(set(self.state.counts)) == 1 and len(set(self.pad)) == 1
            host = [0] * index.shape[0] if same else index.tolist()
            self.pad = [self.pad[i] for i in host]
            self.state.index_rows(index, host)
            if self.state.width:
                self.set_columns()
