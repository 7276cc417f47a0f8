"""``DeltaKVLayer``: one compressed layer of DeltaKV's HF cache (see :mod:`sparse_hf.hf.deltakv_cache`), and the
:class:`SharedScratch` work buffer its decode steps share with the cache's other compressed layers.

Its slot buffers hold the raw tokens (each row's sinks and recent buffer); the compressed tokens live in a core
:class:`~sparse_hf.deltakv.state.CompressedState`. The tokens a decode step rebuilds go to the shared scratch.
"""

from __future__ import annotations

import operator

import torch

from ..deltakv.state import CompressedState, all_offsets
from .layer import SlotLayer


class TensorKeys:
    """The tensors of a buffer signature, as one element of it: equal to another ``TensorKeys`` of as many tensors
    where each pair is the same object (the fast path, one C-level pass: no code path resizes a tensor in place, so
    the same object has the same memory, shape, strides and dtype), or a tensor with the same address, shape, strides
    and dtype (e.g. a new view of the same buffer); ``None`` equals only ``None``. It holds the tensors, so their
    memory cannot be freed and reused while the signature exists.

    One object per layer, not one per tensor: a Python ``__eq__`` call and an object per tensor were most of a DeltaKV
    layer's signature cost at every replayed step (issue 12: ~5 us a layer, 24 layers)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: tuple):
        self.tensors = tensors

    @staticmethod
    def _describe(t):
        return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype)

    def __eq__(self, other) -> bool:
        if not isinstance(other, TensorKeys):
            return NotImplemented
        a, b = self.tensors, other.tensors
        if len(a) != len(b):
            return False
        return all(map(operator.is_, a, b)) or all(
            x is y or self._describe(x) == self._describe(y) for x, y in zip(a, b))

    __hash__ = None


class SharedScratch:
    """One work buffer for every compressed layer of a cache (layers run one after another, so one is enough).

    A static decode step of a layer copies its raw slots to the front (``[0, capacity)``), rebuilds its picked
    compressed tokens right after them (``[capacity, capacity + scratch)``) and runs one dense sparse-decode pass over
    ``[0, capacity + scratch)``: the same slots in the same order as one buffer of the layer's own would hold, without
    a scratch of ``scratch`` slots in every layer (at a 0.1 budget that is a tenth of a full cache per layer).

    Attributes:
        k, v: ``[B, Hkv, L, D]`` / ``[B, Hkv, L, Dv]``; pos: ``[B, Hkv, L]`` long columns (``-1``: empty).
    """

    def __init__(self):
        self.k = self.v = self.pos = None

    def reserve(self, like_k: torch.Tensor, like_v: torch.Tensor, slots: int) -> None:
        """Room for ``slots`` slots of buffers like ``like_k [B, Hkv, *, D]`` / ``like_v`` (new buffers, eagerly, when
        they are too small or of another batch, head count, dtype or device; any captured graph is then stale)."""
        B, Hkv, _, D = like_k.shape
        k = self.k
        same = (k is not None and k.shape[:2] == (B, Hkv) and k.shape[3] == D and self.v.shape[3] == like_v.shape[-1]
                and k.dtype == like_k.dtype and k.device == like_k.device)
        if same and k.shape[2] >= slots:
            return
        # exactly: it grows at flushes (then a captured graph is re-captured anyway), its contents are per step
        self.k = self.v = self.pos = None
        self.k = like_k.new_empty(B, Hkv, slots, D)
        self.v = like_v.new_empty(B, Hkv, slots, like_v.shape[-1])
        self.pos = torch.full((B, Hkv, slots), -1, dtype=torch.long, device=like_k.device)

    def views(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k, v, pos`` slots ``[start, stop)``."""
        if self.k is None or self.k.shape[2] < stop:
            raise RuntimeError(f"the shared DeltaKV scratch holds {0 if self.k is None else self.k.shape[2]} slots, "
                               f"{stop} are needed: reserve() it first (an eager step, not inside a graph capture)")
        return self.k[:, :, start:stop], self.v[:, :, start:stop], self.pos[:, :, start:stop]

    def signature(self) -> tuple:
        return (None,) if self.k is None else (self.k.data_ptr(), self.v.data_ptr(), self.pos.data_ptr(),
                                               self.k.shape[2])

    def nbytes(self) -> int:
        return 0 if self.k is None else sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))


class DeltaKVLayer(SlotLayer):
    """One compressed layer. Reuses ``SlotLayer``'s HF cache API; its slot buffers hold the raw tokens.

    A static decode step rebuilds ``scratch`` compressed tokens into the cache's :class:`SharedScratch` (see
    :meth:`work_views`), after a copy of the raw slots, and attends over both in one dense pass (static shapes, no
    concatenation, CUDA-graph safe).

    Args:
        shared: the cache's work buffer (a layer of its own when ``None``).
        reports_shared: this layer counts the shared buffer's bytes (exactly one layer of a cache does).

    Attributes:
        raw_kpre: ``[B, n, Hkv*D]`` pre-norm keys of the raw slots (``k_norm`` models only), else ``None``.
        raw_pos: ``[B, n]`` int64 RoPE positions of the raw slots. Both are views from index 1 of ``[B, capacity + 1]``
            buffers: slot ``i`` is buffer entry ``i + 1``, so a decode step writes its token (slot ``n_dev - 1``) at
            the slot counter ``n_dev`` itself, one scatter with no index arithmetic or cast.
        state: the compressed tokens (``None`` until the prompt is complete).
        pad: host list ``[B]``, padding columns per row (column = position + pad); ``col_offset`` the same ``[B, 1]``.
        scratch: host int, the rebuilt tokens of a decode step (fixed between flushes).
    """

    def __init__(self, shared: SharedScratch | None = None, reports_shared: bool = True):
        super().__init__()
        self.shared = shared if shared is not None else SharedScratch()
        self.reports_shared = reports_shared
        self._raw_kpre = self._raw_pos = None
        self.scratch = 0
        self.static_ok = False     # whether the latest one-token decode step took the static path
        self.state: CompressedState | None = None
        self.pad: list[int] | None = None
        self.col_offset = None
        self.width_dev = None      # [1] long: the widest row's compressed count, on the device (per flush)
        self.state_version = 0     # + 1 whenever a flush re-allocates the compressed state or its column tables
        self.masked = False        # host flag: a mask has marked slots empty (else every slot is live: no padding)

    def reset(self) -> None:
        self.__init__(self.shared, self.reports_shared)

    def drop_invalid(self, valid: torch.Tensor) -> None:
        """As for every slot layer; and remember (host flag ``masked``) that slots may now be empty, so that the
        prompt's end reads the padding from the device only when there can be some."""
        self.masked = True
        super().drop_invalid(valid)

    # -- the shared work buffer ----------------------------------------------------------------------------------
    def set_scratch(self, width: int) -> None:
        """Rebuild ``width`` compressed tokens per decode step from now on (host int; eager, between decode steps)."""
        self.scratch = width

    def reserve_work(self) -> None:
        """Make the shared buffer fit this layer's raw slots and scratch (eager: never while a graph is captured)."""
        if self._k is not None:
            self.shared.reserve(self._k, self._v, self.capacity + self.scratch)

    def work_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``K [B, Hkv, capacity + scratch, D]``, ``V``, columns: the shared slots a static step attends over."""
        return self.shared.views(0, self.capacity + self.scratch)

    def buffer_signature(self) -> tuple:
        """Everything a static decode step reads or writes: the slot buffers and their counters, the raw positions (and
        pre-norm keys), the per-flush column tables, the compressed state's tensors and the shared work buffer, with
        the scratch width and a version that every flush that re-allocates bumps. A flush re-allocates the state
        without touching the slot buffers, so without it here a CUDA graph captured before a flush would be replayed
        after it on freed memory (an out-of-bounds gather on the H200).

        The layer's tensors go in one :class:`TensorKeys` (compared by object first, then by address, shape, strides
        and dtype: the slot buffers' capacity is their shape), not as ``SlotLayer``'s ``data_ptr`` ints plus a key per
        tensor: this is built and compared at every replayed step, for 24 layers of Qwen2.5-7B (issue 12). The shared
        buffer stays addresses (:meth:`SharedScratch.signature`): a key would hold it, and its re-size frees the old
        one before it allocates the new."""
        s = self.state
        tensors = (self._k, self._v, self._pos, self._counters, self._raw_pos, self._raw_kpre, self.col_offset,
                   self.width_dev)
        if s is not None:
            tensors += (s.comp_pos, s.center_x, s.center_pos, s.fathers, *(s.latent or ()))
        return self.shared.signature(), self.scratch, self.state_version, TensorKeys(tensors)

    def scratch_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``K [B, Hkv, scratch, D]``, ``V``, columns ``[B, Hkv, scratch]``: the shared slots of the rebuilt tokens."""
        return self.shared.views(self.capacity, self.capacity + self.scratch)

    @property
    def raw_pos(self) -> torch.Tensor | None:
        return None if self._raw_pos is None else self._raw_pos[:, 1:1 + self.num_slots]

    @property
    def raw_kpre(self) -> torch.Tensor | None:
        return None if self._raw_kpre is None else self._raw_kpre[:, 1:1 + self.num_slots]

    def _raw_room(self, kpre: torch.Tensor | None, like: torch.Tensor) -> None:
        """Grow the raw position (and pre-norm key) buffers to the raw capacity, plus the leading entry (host shapes
        only)."""
        B, cap = like.shape[0], self.capacity + 1
        if self._raw_pos is None or self._raw_pos.shape[1] < cap:
            new = torch.full((B, cap), -1, dtype=torch.long, device=like.device)
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
        if self.frozen and q == 1:
            at = self.n_dev.view(1, 1).expand(B, 1)            # slot n_dev - 1 is buffer entry n_dev
            self._raw_pos.scatter_(1, at, pos if pos.dtype == torch.long else pos.long())
            if kpre is not None:
                self._raw_kpre.scatter_(1, at.unsqueeze(-1).expand(B, 1, kpre.shape[-1]), kpre)
            return
        n = self.num_slots
        self._raw_pos[:, 1 + n - q:1 + n] = pos
        if kpre is not None:
            self._raw_kpre[:, 1 + n - q:1 + n] = kpre

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
        self._raw_pos[:, 1:1 + K] = pos
        if kpre is not None:
            self._raw_kpre[:, 1:1 + K] = kpre

    @property
    def reads_compressed(self) -> bool:
        """Whether a static decode step rebuilds compressed tokens: once some are held, or from the prompt's end when
        the state has a reserved capacity (its tensors exist before the first flush; their ``-1`` tail is masked)."""
        return self.state is not None and self.state.comp_pos is not None

    def set_columns(self) -> None:
        """Refresh what a decode step reads per flush besides the state: the widest row's count on the device. With a
        reserved capacity (same state tensors at every flush) it is rewritten in place, so a captured decode step
        stays valid; otherwise it is a new tensor (and ``state_version`` moves). The compressed tokens' columns are
        ``comp_pos + col_offset`` (:meth:`compressed_columns`), computed where read, not held per layer."""
        dev = self.state.comp_pos.device
        if not (self.state.capacity and self.width_dev is not None and self.width_dev.device == dev):
            self.state_version += 1
            self.width_dev = torch.zeros(1, dtype=torch.long, device=dev)
        self.width_dev.fill_(self.state.width)

    def compressed_columns(self) -> torch.Tensor:
        """``[B, N]`` int64 logical column of each compressed token (``-1``: none); made when asked."""
        comp_pos = self.state.comp_pos
        return (comp_pos.long() + self.col_offset).masked_fill_(comp_pos < 0, -1)

    @property
    def all_offsets(self) -> torch.Tensor:
        """``[B, N]`` every compressed offset (a rebuild of all of them; made when asked, not held)."""
        return all_offsets(self.state)[0]

    def compressed_per_row(self) -> list[int]:
        """Compressed tokens per row."""
        return list(self.state.counts) if self.state is not None else [0] * self.positions.shape[0]

    def allocated_bytes(self) -> int:
        return sum(self.bytes_by_part().values())

    def used_bytes(self) -> int:
        """Live raw slots plus everything beside them (latents, centers, ids, positions, the shared scratch)."""
        return self.allocated_bytes() - SlotLayer.allocated_bytes(self) + super().used_bytes()

    def bytes_by_part(self) -> dict[str, int]:
        """Allocated bytes of this layer by part; :meth:`allocated_bytes` is their sum."""
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()

        parts = {"raw K/V + slot positions (sinks + buffer)": SlotLayer.allocated_bytes(self),
                 "shared scratch (raw copy + rebuilt tokens of a decode step; one for all layers)":
                     self.shared.nbytes() if self.reports_shared else 0,
                 "raw pre-norm keys (Qwen3 buffer)": size(self._raw_kpre), "raw positions": size(self._raw_pos),
                 "row offsets and width (device)": size(self.width_dev) + size(self.col_offset)}
        return {**parts, **(self.state.bytes_by_part() if self.state is not None else {})}

    def host_bytes(self) -> int:
        """Bytes this layer holds in host memory (the latents with ``offload_latents``; not in :meth:`allocated_bytes`,
        which counts the compute device's)."""
        return self.state.host_bytes() if self.state is not None else 0

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
            if self.state.comp_pos is not None:
                self.set_columns()
