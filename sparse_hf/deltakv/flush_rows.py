"""The index work of one DeltaKV flush, made from the host counts and the tokens' positions alone: which offsets are
centers and where each token's fields go. Every compressed layer of a model flushes the same tokens at the same step
(same counts, same positions), so an adapter makes it once per step and hands it to each layer's
:func:`~sparse_hf.deltakv.state.flush` (``rows=``); without it ``flush`` makes its own. No Transformers here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FlushRows:
    """One flush's indices, for a state holding ``before`` tokens per row that compresses ``counts`` more.

    Attributes:
        before, counts, capacity, width: the host facts it was made for (:meth:`fits` checks them).
        after: host list ``[B]``, compressed tokens per row after the flush.
        widths: ``(M, N, N')`` rows of the centers, offsets and latents/father ids the flush writes.
        start, count: ``[B, 1]`` int64, ``before`` and ``counts`` on the device.
        j: ``[B, C]`` each token's offset; live / is_center / other: ``[B, C]`` bool, compressed / a center / a latent.
        center_at: ``[B, C]`` a center's row in the centers; dest: ``[B, C]`` a latent's row in the latents.
        pos: ``[B, C]`` int32 RoPE positions.
        targets: the scatter indices made so far from these (``state._scatter_rows``), shared by the layers.
    """

    before: tuple
    counts: tuple
    capacity: int
    width: int
    after: list
    widths: tuple
    start: torch.Tensor
    count: torch.Tensor
    j: torch.Tensor
    live: torch.Tensor
    is_center: torch.Tensor
    other: torch.Tensor
    center_at: torch.Tensor
    dest: torch.Tensor
    pos: torch.Tensor
    targets: dict = field(default_factory=dict)

    def fits(self, state, counts: list[int], width: int, device: torch.device) -> bool:
        """Whether these rows serve ``flush(state, x [B, width, *], ..., counts)`` on ``device`` (host values only;
        the tokens' positions are the caller's promise)."""
        return (self.before == tuple(state.counts) and self.counts == tuple(counts)
                and self.capacity == state.capacity and self.width == width and self.j.device == device)


def host_ints(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """``[len(rows), B]`` int64 on ``device`` from host lists of ints, without a host-device sync: on CUDA from
    pinned memory with a ``non_blocking`` copy (a plain ``torch.tensor(list, device=cuda)`` copies from pageable
    memory and then waits for the whole stream, which drains the GPU's queue in the middle of a prefill). PyTorch's
    pinned allocator keeps the host block until the copy has run, so the lists may change right after."""
    device = torch.device(device)
    pinned = device.type == "cuda"
    return torch.tensor(rows, dtype=torch.long, pin_memory=pinned).to(device, non_blocking=pinned)


def flush_rows(state, counts: list[int], pos: torch.Tensor) -> FlushRows:
    """The rows of a flush of ``counts`` tokens per row at positions ``pos [B, C]`` into ``state`` (a
    :class:`~sparse_hf.deltakv.state.CompressedState` whose capacity already covers the flush)."""
    cl = state.clustering
    B, C = pos.shape
    S, step, dev = cl.num_sink, cl.step, pos.device
    after = [n + c for n, c in zip(state.counts, counts)]
    # the tensors' widths: the reservation's, else what the widest row needs now
    width_c, width_n, width_l = state.field_widths(state.capacity or max(after))
    if not state.capacity:
        width_c = max(cl.num_centers(n) for n in after)
        width_l = max(cl.num_latents(n) for n in after)
    start, count = host_ints([state.counts, counts], dev).view(2, B, 1)       # one upload, no sync
    arange = torch.arange(C, device=dev).view(1, C)
    j = start + arange                                                        # [B, C] offsets
    live = arange < count
    is_center = live & (j % step == 0)
    group = j // step                          # each offset's center group: its center sits at S + group
    return FlushRows(tuple(state.counts), tuple(counts), state.capacity, C, after, (width_c, width_n, width_l),
                     start, count, j, live, is_center, live & ~is_center, S + group, j - group - 1,
                     pos.to(torch.int32))
