"""The inputs of a decode step in static device buffers, filled from a pinned host twin with one async copy.

Why: a step built its inputs with ``torch.tensor(list, device=cuda)`` calls; each is a pageable host-to-device
copy that waits for all earlier GPU work, so the host could not prepare step ``n + 1`` while step ``n`` ran and
every small copy cost a round trip. Here the host writes every per-row value of the step (token ids, positions,
rows, the slot-table column of the new token, the slot counts) into one pinned buffer through numpy views, and
one ``non_blocking`` copy moves it; the device views are what the model (or the captured CUDA graph) reads.

Layout (``B`` = ``max_rows``, ``G`` slot groups), one byte buffer with typed views:

- int64: ``ids [B]``, ``positions [B]``, ``rows [B]``, ``cols [G, B]`` (table column of each row's new slot);
- int32: ``lens [G, B]`` (slots per row, the new token included: what the attention kernels read).

Rows ``B_real..b`` of a padded batch (a CUDA-graph bucket) get token 0 at position 0, row 0, count 0: they attend
to nothing; their K/V go to the pool's scratch slot (``slot_mapping``, a device-only buffer).
"""

from __future__ import annotations

import numpy as np
import torch


class DecodeInputs:
    """Static decode-step inputs for up to ``max_rows`` rows over ``num_groups`` slot groups (see the module doc)."""

    def __init__(self, max_rows: int, num_groups: int, scratch_slot: int, device: torch.device):
        B, G = max_rows, num_groups
        self.max_rows, self.num_groups, self.scratch_slot = B, G, scratch_slot
        n64, n32 = 3 * B + G * B, G * B
        nbytes = 8 * n64 + 4 * n32
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device) if self.cuda else self.host
        self.ids, self.positions, self.rows, self.cols, self.lens = self._views(self.buffer, B, G)
        host_views = self._views(self.host, B, G)
        self._np = [t.numpy() for t in host_views]                 # ids, positions, rows, cols, lens (host)
        #: ``[G, B]`` long: each row's new slot per group; padding rows (and stale columns) hold the scratch slot.
        self.slot_mapping = torch.full((G, B), scratch_slot, dtype=torch.long, device=device)
        self._slots_written = 0                                    # columns of slot_mapping that may be stale
        self._copied = torch.cuda.Event() if self.cuda else None   # the last upload's copy, before reusing ``host``
        self._pending = False

    @staticmethod
    def _views(buf: torch.Tensor, B: int, G: int):
        n64 = 3 * B + G * B
        i64 = buf[: 8 * n64].view(torch.int64)
        i32 = buf[8 * n64:].view(torch.int32)
        return i64[:B], i64[B: 2 * B], i64[2 * B: 3 * B], i64[3 * B:].view(G, B), i32.view(G, B)

    def stage(self, ids, positions, rows, lens_before: np.ndarray, padded: int) -> None:
        """Write one step's inputs for ``len(rows)`` rows, padded to ``padded`` rows, and start their upload.

        Args:
            ids, positions, rows: ``B`` ints each (token id, its position, the row of the pool's tables).
            lens_before: ``[G, B]`` host slot counts of the rows before this step's token.
            padded: ``b >= B`` rows the step runs (a CUDA-graph bucket; ``B`` when eager).
        """
        B, b = len(rows), padded
        if b > self.max_rows:
            raise ValueError(f"a decode step of {b} rows exceeds the {self.max_rows} input rows")
        if self._pending:
            self._copied.synchronize()        # the previous upload has read ``host`` (normally long done)
        h_ids, h_pos, h_rows, h_cols, h_lens = self._np
        h_ids[:B], h_pos[:B], h_rows[:B] = ids, positions, rows
        h_cols[:, :B] = lens_before
        h_lens[:, :B] = lens_before + 1
        if b > B:
            h_ids[B:b] = 0
            h_pos[B:b] = 0
            h_rows[B:b] = 0
            h_cols[:, B:b] = 0
            h_lens[:, B:b] = 0
        if self.cuda:
            self.buffer.copy_(self.host, non_blocking=True)
            self._copied.record()
            self._pending = True

    def set_slots(self, slots: torch.Tensor, padded: int) -> torch.Tensor:
        """Copy this step's new slots ``[G, B]`` (device, any int dtype) into ``slot_mapping``; columns ``B..padded``
        hold the scratch slot. Returns the ``[G, padded]`` view."""
        B = slots.shape[1]
        self.slot_mapping[:, :B].copy_(slots)
        if self._slots_written > B:           # stale real slots of an earlier, wider step: back to scratch
            self.slot_mapping[:, B: self._slots_written].fill_(self.scratch_slot)
        self._slots_written = B
        return self.slot_mapping[:, :padded]
