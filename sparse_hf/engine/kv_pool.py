"""The KV pool: token slots per layer, per-row slot tables on the device, and free-slot stacks that eviction
really refills.

Layout (one pool per layer ``l``):

- ``k[l]``, ``v[l]``: ``[S + 1, Hkv, D]`` (the last slot is scratch), slot-major, so one slot holds one token's
  K (or V) for every KV head.
- Layers are grouped by how their slots are managed: a *group* shares one free stack ``free[g]`` (``[S]``
  int32, the first ``free_top[g]`` entries are free slot ids), one slot table ``tables[g]`` (``[rows, W]``
  int32: entry ``j`` of row ``r`` is the slot of the row's ``j``-th kept token, in increasing position order)
  and one count per row ``lens[g, r]`` (host). Full attention and OmniKV (nothing evicted) use one group for
  all layers, so a token costs one allocation; eviction methods use one group per layer (PyramidKV's budgets,
  StreamingLLM's rolling window and SnapKV's choices differ per layer).
- Per-KV-head eviction without per-head tables: each head of a row keeps the same *number* of tokens (the
  methods' budgets are per row), so after a selection ``idx [Hkv, K]`` the row's first ``K`` slots are rewritten
  head by head with the kept tokens (a compaction copy of ``K`` tokens, once per eviction) and its other slots
  return to the free stack. Keys carry RoPE already, so a slot needs no position after that.

All counts are known on the host, so allocation and release need no device-to-host sync.
"""

from __future__ import annotations

import numpy as np
import torch

from sparse_hf.kernels import store_kv_slots


class KVPool:
    """Slots of ``num_layers`` layers; see the module docstring for the layout.

    Args:
        num_slots: ``S``, slots per layer (each holds all KV heads of one token).
        max_rows: rows of the slot tables (``max_num_seqs``); max_len: ``W``, table width (``max_model_len``).
        per_layer_groups: one slot group per layer (eviction methods) instead of one for all layers.
        layer_groups: the group of each layer (``[num_layers]`` ints from 0), overriding ``per_layer_groups``
            (DeltaKV: its filter layers in one group, its compressed layers in another).
        group_slots: slots per layer of each group (default ``num_slots`` for all); ``num_slots`` is then the
            smallest (what a row can count on in every layer). With groups of unequal sizes ``scratch_slot`` is
            only scratch in the smallest group: no padding rows.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int, max_rows: int,
                 max_len: int, per_layer_groups: bool, dtype: torch.dtype, device: torch.device,
                 layer_groups: list[int] | None = None, group_slots: list[int] | None = None):
        if layer_groups is None:
            layer_groups = [layer if per_layer_groups else 0 for layer in range(num_layers)]
        G = max(layer_groups) + 1
        self.group_slots = list(group_slots) if group_slots is not None else [num_slots] * G
        num_slots = min(self.group_slots)
        self.num_layers, self.num_slots, self.max_rows, self.max_len = num_layers, num_slots, max_rows, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # One extra slot (``scratch_slot``) takes the K/V writes of padding rows of a CUDA-graph batch.
        # With groups of unequal sizes it is a real slot of the larger groups: no padding rows then (DeltaKV's graphs
        # run exactly the step's rows).
        self.scratch_slot = num_slots
        self.k, self.v = self._kv_tensors([self.group_slots[g] + 1 for g in layer_groups], num_kv_heads, head_dim,
                                          dtype, device)
        self.num_groups = G
        self.group_of = list(layer_groups)
        self.layers_of = [[layer for layer in range(num_layers) if self.group_of[layer] == g] for g in range(G)]
        self.free = torch.arange(max(self.group_slots), dtype=torch.int32, device=device).repeat(G, 1)  # [G, S]
        self.free_top = list(self.group_slots)
        self.tables = torch.zeros(G, max_rows, max_len, dtype=torch.int32, device=device)       # [G, rows, W]
        self.lens = np.zeros((G, max_rows), dtype=np.int64)
        self.device = device
        self._group_index = torch.arange(G, device=device).view(G, 1)                       # [G, 1]
        self._layers_per_group = np.array([len(layers) for layers in self.layers_of], dtype=np.int64)
        #: Rows released since the last :meth:`take_released` when recording (tensor parallelism: rank 0 sends them
        #: to the other ranks with the next step, so their pools free the same rows); ``None``: not recording.
        self.released: list[int] | None = None

    @staticmethod
    def _kv_tensors(sizes: list[int], num_kv_heads: int, head_dim: int, dtype, device):
        """``(k, v)``: per layer ``l`` a zeroed ``[sizes[l], Hkv, D]`` tensor each."""
        k = [torch.zeros(n, num_kv_heads, head_dim, dtype=dtype, device=device) for n in sizes]
        return k, [torch.zeros_like(t) for t in k]

    # -- accounting ------------------------------------------------------------------------------------------
    def num_free(self) -> int:
        """Free slots of the fullest group (what a new token can count on in every layer)."""
        return min(self.free_top)

    def used_slots(self) -> int:
        """Slots in use, summed over groups (times the group's layers: the tokens held over all layers)."""
        return sum((self.group_slots[g] - top) * len(self.layers_of[g]) for g, top in enumerate(self.free_top))

    def total_slots(self) -> int:
        """Slots of every layer together (groups may differ in size)."""
        return sum(self.group_slots[g] * len(self.layers_of[g]) for g in range(self.num_groups))

    def row_tokens(self, row: int) -> int:
        """Slots row ``row`` holds, summed over all layers."""
        return int(self.lens[:, row] @ self._layers_per_group)

    def bytes_per_slot(self) -> int:
        """Bytes of one token's K and V over every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k[0].element_size()

    def check_whole(self) -> None:
        """Raise ``AssertionError`` unless every slot is free exactly once (no leak, no double free)."""
        for g in range(self.num_groups):
            n = self.group_slots[g]
            assert self.free_top[g] == n, f"group {g}: {n - self.free_top[g]} slots in use"
            ids = torch.sort(self.free[g, :n].long()).values.cpu()
            assert torch.equal(ids, torch.arange(n)), f"group {g}: free stack is not a permutation"
        assert not self.lens.any(), "rows still hold slots"

    # -- allocation ----------------------------------------------------------------------------------------------
    def allocate(self, rows: list[int], counts: list[int]) -> torch.Tensor:
        """Append ``counts[i]`` new slots to row ``rows[i]`` in every group.

        Returns:
            ``slot_mapping`` ``[G, T]`` long (``T = sum(counts)``), in the order of ``rows`` then position: where
            each new token's K/V goes in each group.
        """
        T = int(sum(counts))
        row_of = np.repeat(np.asarray(rows, dtype=np.int64), counts)                       # [T]
        offset = np.arange(T) - np.repeat(np.cumsum(counts) - np.asarray(counts), counts)  # position within row
        pos = self.lens[:, row_of] + offset[None, :]                                       # [G, T]
        if (pos >= self.max_len).any():
            raise RuntimeError(f"a row outgrew the slot table width {self.max_len} (max_model_len)")
        slots = self._pop_free(T)
        g_idx = torch.arange(self.num_groups, device=self.device).view(-1, 1).expand(-1, T)
        self.tables[g_idx, torch.as_tensor(row_of, device=self.device).expand(self.num_groups, T),
                    torch.as_tensor(pos, device=self.device)] = slots
        np.add.at(self.lens, (slice(None), np.asarray(rows, dtype=np.int64)), np.asarray(counts, dtype=np.int64))
        return slots.long()

    def allocate_decode(self, rows: list[int], rows_dev: torch.Tensor, cols_dev: torch.Tensor) -> torch.Tensor:
        """One new slot for each of ``rows`` (distinct) in every group: the decode step's :meth:`allocate`, with no
        host-to-device copy of its own (the table entries are written from the step's device inputs).

        Args:
            rows: the ``B`` rows (host); rows_dev: ``[B]`` long, the same on the device.
            cols_dev: ``[G, B]`` long on the device, each row's slot count before this token (``lens[:, rows]``):
                the table column of the new slot.

        Returns:
            ``[G, B]`` int32 slot ids (a view of the free stack: consume it in this step).
        """
        B = len(rows)
        if (self.lens[:, rows] >= self.max_len).any():
            raise RuntimeError(f"a row outgrew the slot table width {self.max_len} (max_model_len)")
        slots = self._pop_free(B)
        self.tables[self._group_index, rows_dev.view(1, B), cols_dev] = slots
        self.lens[:, rows] += 1
        return slots

    def _pop_free(self, n: int) -> torch.Tensor:
        """Take ``n`` slots off every group's free stack: ``[G, n]`` int32 (a view when the stacks are level)."""
        if n > self.num_free():
            raise RuntimeError(f"KV pool exhausted: {n} slots needed, {self.num_free()} free (scheduler bug)")
        tops = self.free_top
        if all(t == tops[0] for t in tops):
            slots = self.free[:, tops[0] - n: tops[0]]
        else:
            slots = torch.stack([self.free[g, t - n: t] for g, t in enumerate(tops)])
        self.free_top = [t - n for t in tops]
        return slots

    def _push_free(self, g: int, slots: torch.Tensor) -> None:
        n = slots.numel()
        top = self.free_top[g]
        self.free[g, top: top + n] = slots
        self.free_top[g] = top + n

    def take_released(self) -> list[int]:
        """The rows released since the last call (recording must be on: ``released`` a list)."""
        rows, self.released = self.released, []
        return rows

    def release_row(self, row: int) -> None:
        """Return every slot of ``row`` to the free stacks."""
        if self.released is not None:
            self.released.append(row)
        for g in range(self.num_groups):
            n = int(self.lens[g, row])
            if n:
                self._push_free(g, self.tables[g, row, :n])
            self.lens[g, row] = 0

    def keep(self, group: int, row: int, idx: torch.Tensor) -> None:
        """Keep, per KV head, the row's tokens at table positions ``idx`` (``[Hkv, K]`` long, increasing along
        ``K``); free the rest. The kept K/V move to the row's first ``K`` slots of every layer of ``group``."""
        n = int(self.lens[group, row])
        K = idx.shape[-1]
        table = self.tables[group, row]
        src = table[:n].long()[idx]                                                    # [Hkv, K] slot ids
        dst = table[:K].long()
        heads = torch.arange(self.num_kv_heads, device=self.device).view(-1, 1)
        for layer in self.layers_of[group]:
            for pool in self.slot_tensors(layer):
                kept = pool[src, heads]                                                # [Hkv, K, D]
                pool[dst.view(1, -1).expand_as(src), heads] = kept
        if K < n:
            self._push_free(group, table[K:n].clone())
        self.lens[group, row] = K

    def slot_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The ``[S + 1, Hkv, *]`` tensors of ``layer`` indexed by its slot ids (its K and V): what :meth:`keep`
        moves. A pool that keeps more per slot (DeltaKV's pre-norm keys) adds its own."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` (``[T, Hkv, D]``) at slots ``slot_mapping`` (``[T]`` long) of ``layer``.

        One launch of the shared slot-mapping store kernel (Triton on CUDA, its torch reference elsewhere)."""
        store_kv_slots(self.k[layer], self.v[layer], k.to(self.k[layer].dtype), v.to(self.v[layer].dtype),
                       slot_mapping)
