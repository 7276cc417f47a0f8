"""Latents off the GPU (DeltaKV's ``offload_latents=True``): the latents and their int8/int4 scales live in pinned
host memory, which the GPU reads and writes in place; every other part of the compressed state stays on the GPU.

Why in place (zero-copy) and not a host gather: the tokens a decode step rebuilds are picked on the GPU (the filter
layer's top-k). A host-side gather would first need the picks on the host (a device-to-host sync every step, which
stalls the launch queue and cannot be captured in a CUDA graph), then a copy to a staging buffer. Pinned memory is
mapped into the GPU's address space (unified virtual addressing, every 64-bit CUDA platform), so a kernel can load
from it directly: the existing gather kernel (:func:`sparse_hf.kernels.deltakv_gather_latents`) reads exactly the
picked rows across PCIe and nothing else moves. No host sync, no per-step allocation, static shapes: CUDA-graph
decode (``cuda_graph=True``) captures it like the on-GPU layout (the host pages are addressed by pointer, and the
pointers change only when the store grows, which the cache's buffer signature already turns into a re-capture).

The price: the picked rows cross PCIe at every step (``B * k * bytes_per_latent`` per compressed layer, e.g.
13K picks of an int4 latent-256 at 160 bytes: 2 MB per layer at 128K tokens and a 0.1 budget), read by the gather
kernel with the latency of host memory. It pays when the latents would not fit on the GPU; see
``docs/deltakv_quality.md`` for the H200 figures.

On a machine without CUDA the "device" is the host: the store is ordinary CPU memory and takes the same code path
(capacity, in-place writes, row reindexing), so CPU tests cover it.

Layout: each stored field (``codes``, ``scale``, ``offset`` of a :class:`~sparse_hf.deltakv.quant.QuantizedLatent`)
is a ``[B, capacity, w]`` host tensor; the state sees ``[B, N', w]`` views of its first ``N'`` latent rows (the same
shapes and values as the on-GPU layout; rows past a row's own count hold zeros or garbage, never read unmasked).
The capacity grows to powers of two (the pinned allocator rounds to them anyway), so a decode rarely re-allocates.
"""

from __future__ import annotations

import contextlib

import torch

from .quant import QuantizedLatent

#: Smallest capacity (latent rows per batch row) of a store.
MIN_CAPACITY = 256


class _HostArray:
    """A ``__cuda_array_interface__`` over a pinned host tensor's bytes (its pointer is a device pointer under UVA).

    Holds the host tensor: the device view built from it keeps the host memory alive."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 2}


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor on ``device`` that aliases the pinned host tensor ``host`` (same shape and dtype): kernels that
    read or write it access the host pages across PCIe. Raises ``RuntimeError`` when the memory is not addressable
    from the GPU (the view would otherwise be a silent device copy)."""
    if not host.is_pinned():
        raise RuntimeError("offload_latents: the host buffer is not pinned, so the GPU cannot address it")
    flat = torch.as_tensor(_HostArray(host), device=device)
    if flat.data_ptr() != host.data_ptr():
        raise RuntimeError(f"offload_latents: {device} cannot address pinned host memory in place (no unified "
                           f"virtual addressing?); run with offload_latents=False")
    return flat.view(host.dtype).view(host.shape)


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(host, view)``: a zeroed host tensor (pinned when ``device`` is CUDA) and the tensor kernels on ``device``
    use for it (its :func:`device_view`; the host tensor itself on CPU)."""
    if device.type == "cpu":
        host = torch.zeros(shape, dtype=dtype)
        return host, host
    if device.type != "cuda":
        raise ValueError(f"offload_latents supports CUDA and CPU devices, not {device.type}")
    host = torch.zeros(shape, dtype=dtype, pin_memory=True)
    return host, device_view(host, device)


def _capacity(rows: int) -> int:
    """Latent rows per batch row to allocate for ``rows`` (one more, for the scatter's dump column)."""
    return max(MIN_CAPACITY, 1 << rows.bit_length())     # > rows: a power of two at least rows + 1


class OffloadedLatents:
    """One layer's latent fields in host memory, ``[B, capacity, w]`` each, written and read in place.

    Attributes:
        width: ``N'``, the latent rows the state uses (the widest row's count).
        hosts: the host tensors (``None`` for an absent field), views: what kernels use (see the module docstring).
    """

    def __init__(self):
        self.width = 0
        self.hosts: tuple[torch.Tensor | None, ...] = ()
        self.views: tuple[torch.Tensor | None, ...] = ()

    @property
    def capacity(self) -> int:
        return next((v.shape[1] for v in self.views if v is not None), 0)

    def latent(self) -> QuantizedLatent:
        """The stored latents as the state reads them: ``[B, width, w]`` views of each field."""
        return QuantizedLatent(*(None if v is None else v[:, :self.width] for v in self.views))

    def _allocate(self, like: QuantizedLatent, batch: int, capacity: int, device: torch.device) -> None:
        pairs = [(None, None) if t is None else host_buffer((batch, capacity, t.shape[-1]), t.dtype, device)
                 for t in like]
        self.hosts, self.views = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def _move_from(self, old_views: tuple, copy) -> None:
        """``copy(new, old)`` each field of the previous buffers ``old_views`` into the current ones (in stream
        order); the old pinned pages are released only once the device is done with them (a store grows or is
        reindexed rarely: one sync then)."""
        for new, old in zip(self.views, old_views):
            if old is not None:
                copy(new, old)
        if any(v is not None and v.is_cuda for v in old_views):
            torch.cuda.current_stream(next(v for v in old_views if v is not None).device).synchronize()

    def write(self, width: int, dest: torch.Tensor, mask: torch.Tensor, values: QuantizedLatent,
              exact: bool = False) -> QuantizedLatent:
        """Write ``values`` (fields ``[B, C, w]`` on the compute device) at latent rows ``dest [B, C]`` where
        ``mask [B, C]``, after growing to ``width`` rows (the state's ``_write_rows`` contract, in place); returns
        :meth:`latent`. No host-device sync unless the capacity grows.

        ``exact``: a store of exactly ``width + 1`` rows (a reserved capacity,
        :meth:`~sparse_hf.deltakv.state.CompressedState.reserve`: ``width`` is then the same at every write, so
        the views keep their addresses and shapes), not a power of two."""
        B, C = dest.shape
        device = dest.device
        if not self.views or width + 1 > self.capacity:
            old_views, old_width = self.views, self.width
            self._allocate(values, B, width + 1 if exact else _capacity(width), device)
            self._move_from(old_views, lambda new, old: new[:, :old_width].copy_(old[:, :old_width]))
        self.width = width
        dump = self.capacity - 1   # > width - 1: masked entries land past every row's latents
        idx = torch.where(mask, dest, dump)
        for view, new in zip(self.views, values):
            if view is not None:
                at = idx.view(B, C, 1).expand(B, C, new.shape[-1]).to(view.device)
                view.scatter_(1, at, new.to(view.dtype).to(view.device))
        return self.latent()

    def index_rows(self, index: torch.Tensor) -> QuantizedLatent:
        """Keep batch rows ``index [B']`` (e.g. beams), into new host buffers; returns :meth:`latent`."""
        old_views = self.views
        like = QuantizedLatent(*(None if v is None else v[:0] for v in old_views))
        device = next(v.device for v in old_views if v is not None)
        self._allocate(like, index.shape[0], self.capacity, device)
        self._move_from(old_views, lambda new, old: torch.index_select(old, 0, index.to(old.device), out=new))
        return self.latent()

    def nbytes(self) -> int:
        """Host bytes allocated (the whole capacity)."""
        return sum(h.numel() * h.element_size() for h in self.hosts if h is not None)


class LatentPrefetch:
    """One decode step's picked latents of every offloaded layer, gathered (and dequantised) from host memory on a
    side CUDA stream as soon as the pick is known, so that the PCIe reads of later layers overlap the compute of
    earlier ones; each layer's rebuild waits on its own event.

    The pick is shared by the step's compressed layers (the filter layer's top tokens), so one launch at the first
    compressed layer covers them all. CUDA-graph safe: the side stream forks from the current one (``wait_stream``)
    and every layer joins it back (``wait_event``) before its rebuild, so a captured step holds the whole pattern.
    On CPU the gathers run inline at launch (same values, same plumbing).

    Memory: ``B * k * r`` values in ``dtype`` per layer while a step runs (the dequantised picks, which the rebuild
    would allocate one layer at a time without the prefetch).
    """

    def __init__(self):
        self.stream = None
        self.pick = None
        self.pending: dict[int, tuple[torch.Tensor, object]] = {}

    def launch(self, pick: torch.Tensor, latents: dict[int, QuantizedLatent], step: int, dtype: torch.dtype) -> None:
        """Gather ``pick [B, k]``'s rows of each layer's ``latents`` (layer -> stored fields ``[B, N', w]``) into
        ``[B, k, r]`` in ``dtype``; taken back with :meth:`take`."""
        from sparse_hf.kernels import deltakv_gather_latents

        self.pick, self.pending = pick, {}
        side = None
        if pick.is_cuda:
            if self.stream is None or self.stream.device != pick.device:
                self.stream = torch.cuda.Stream(pick.device)
            side = self.stream
            side.wait_stream(torch.cuda.current_stream(pick.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for layer, stored in latents.items():
                z = deltakv_gather_latents(pick, stored.codes, stored.scale, stored.offset, step, dtype)
                event = None
                if side is not None:
                    event = torch.cuda.Event()
                    event.record(side)
                self.pending[layer] = (z, event)

    def take(self, layer: int, pick: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s prefetched latents ``[B, k, r]`` for ``pick``, or ``None`` when none were launched for this
        layer and this very pick. The current stream waits for the layer's gather either way (a CUDA-graph capture
        must join every forked stream)."""
        if layer not in self.pending:
            return None
        z, event = self.pending.pop(layer)
        if event is not None:
            torch.cuda.current_stream(z.device).wait_event(event)
        return z if pick is self.pick else None
