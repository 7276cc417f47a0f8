"""One layer's DeltaKV compressed tokens as a small state object, with ``flush`` and ``rebuild`` over it.

No Hugging Face types: the HF cache (``sparse_hf/hf/deltakv_cache.py``) and the engine are adapters that hand over
raw tokens and take back rebuilt K/V. Rows are independent: each row has its own sinks, compressed count and
centers, counted from its first real token, so a row's state never depends on the other rows of a batch.

Per row ``b`` (``n_b = counts[b]`` compressed tokens, at offsets ``j = 0 .. n_b - 1`` in arrival order):

- ``comp_pos [B, N]`` int32: RoPE position of offset ``j`` (``-1`` past ``n_b``); ``N = max_b n_b``.
- ``center_x [B, M, Dx]``, ``center_pos [B, M]`` int32: raw pre-RoPE ``x = concat(K, V)`` of the centers: the row's
  ``num_sink`` sinks at ``0 .. S-1``, then offset ``j`` with ``j % step == 0`` at ``S + j // step``
  (``center_pos == -1``: no center there yet).
- ``latent`` ``[B, N', r]`` (a :class:`QuantizedLatent`) and ``fathers [B, N', k]`` (indices into the centers) for
  the non-center offsets: offset ``j`` at ``j - j // step - 1``.

With ``Clustering.offload_latents`` the ``latent`` fields are views of a host-memory store
(:class:`~sparse_hf.deltakv.offload.OffloadedLatents`, pinned and read in place by the GPU), written in place by
:func:`flush`; every other tensor stays on the compute device.

**Reserved capacity** (:meth:`CompressedState.reserve`, for CUDA-graph decode when the final length is known): every
tensor above is allocated once for ``capacity`` compressed tokens per row (``N = capacity``, ``M`` and ``N'`` the
centers and latents of that many) and every later :func:`flush` writes into the same memory, so a captured decode
step that reads them stays valid. Their second dims are then the capacity, not the widest row's count
(:attr:`CompressedState.width` still is); the unused tail holds ``-1`` positions and father ids, zero centers and
latents, which every reader already masks (the per-row counts are ``comp_pos >= 0``). A flush past the capacity
re-allocates exactly what it needs (as without a reservation). Without a reservation (the default, and the engine's
use) the tensors grow to ``max(counts)`` at each flush, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparse_hf.kernels import deltakv_rebuild_kv, deltakv_writeback

from .clustering import METRICS, compress, nearest_centers, reconstruct, reference_from_fathers
from .flush_rows import FlushRows, flush_rows
from .offload import OffloadedLatents
from .quant import QuantizedLatent, check_bits, dequantize, quantize


@dataclass(frozen=True)
class Clustering:
    """The knobs of one compressed layer: sinks per row, distance between centers, fathers per token, the
    similarity metric, the latent storage bits (0, 8 or 4) and whether the latents live in host memory
    (:mod:`sparse_hf.deltakv.offload`)."""

    num_sink: int
    step: int
    neighbor_count: int = 1
    metric: str = "l2"
    quant_bits: int = 0
    offload_latents: bool = False

    def __post_init__(self):
        if self.num_sink < 0 or self.step < 1 or self.neighbor_count < 1:
            raise ValueError(f"Clustering needs num_sink >= 0, step >= 1 and neighbor_count >= 1; got {self}")
        if self.metric not in METRICS:
            raise ValueError(f"cluster_metric={self.metric!r}: expected one of {', '.join(METRICS)}")
        check_bits(self.quant_bits)
        if not isinstance(self.offload_latents, bool):
            raise ValueError(f"offload_latents={self.offload_latents!r}: expected True or False")

    def num_centers(self, compressed: int) -> int:
        """Centers of a row with ``compressed`` tokens: its sinks plus one per ``step`` offsets."""
        return self.num_sink + math.ceil(compressed / self.step)

    def num_latents(self, compressed: int) -> int:
        """Latents of a row with ``compressed`` tokens (the non-centers)."""
        return compressed - math.ceil(compressed / self.step)


class CompressedState:
    """The compressed tokens of one layer, per row (see the module docstring for the layout).

    Attributes:
        counts: host list ``[B]``, compressed tokens per row (host ints: the adapter plans flushes without syncs).
        comp_pos, center_x, center_pos, latent, fathers: as in the module docstring (``None`` until the first flush).
        offloaded: with ``clustering.offload_latents``, the host store that ``latent`` views (else ``None``).
        capacity: reserved compressed tokens per row (0: none, the tensors grow at each flush); see :meth:`reserve`.
    """

    def __init__(self, batch: int, clustering: Clustering):
        self.clustering = clustering
        self.counts = [0] * batch
        self.comp_pos: torch.Tensor | None = None
        self.center_x: torch.Tensor | None = None
        self.center_pos: torch.Tensor | None = None
        self.latent: QuantizedLatent | None = None
        self.fathers: torch.Tensor | None = None
        self.offloaded = OffloadedLatents() if clustering.offload_latents else None
        self.capacity = 0
        # with a capacity: field name -> its [B, rows + 1, *] store (the last row takes masked scatter writes); the
        # attribute of the same name is the store's [:, :rows] view
        self._stores: dict[str, torch.Tensor] = {}
        # during a flush: (dest, mask, dump) ids -> the scatter index, shared by the fields written at the same rows
        self._targets: dict | None = None

    def reserve(self, capacity: int) -> None:
        """Hold room for ``capacity`` compressed tokens per row from now on: the next :func:`flush` (or
        :meth:`allocate`) allocates every tensor for it once, and flushes up to it write in place (same
        ``data_ptr``s, same shapes). Never below the tokens already held; 0 keeps today's growth."""
        capacity = int(capacity)
        if capacity < 0 or (capacity and capacity < self.width):
            raise ValueError(f"CompressedState.reserve({capacity}): the state already holds {self.width} compressed "
                             f"tokens in a row; reserve at least that many (or 0 for no reservation)")
        self.capacity = capacity

    def field_widths(self, compressed: int) -> tuple[int, int, int]:
        """``(M, N, N')``: the centers, compressed offsets and latent rows of ``compressed`` tokens per row."""
        cl = self.clustering
        return cl.num_centers(compressed), compressed, cl.num_latents(compressed)

    def allocate(self, x_like: torch.Tensor, latent_like: QuantizedLatent) -> None:
        """Allocate every tensor for the reserved capacity now, before any token is compressed (so that a decode
        step captured before the first flush reads the tensors every later flush writes). ``x_like [B, *, Dx]``
        gives the batch, center width, dtype and device, ``latent_like`` the stored latent fields' widths and
        dtypes (e.g. ``quantize`` of a ``[B, 0, r]`` tensor). A no-op without a capacity."""
        if not self.capacity:
            return
        B, dev = x_like.shape[0], x_like.device
        m, n, n_lat = self.field_widths(self.capacity)
        none = torch.zeros(B, 0, dtype=torch.long, device=dev)
        empty = none.bool()
        self._write("center_x", m, none, empty, x_like[:, :0], 0)
        self._write("center_pos", m, none, empty, none.to(torch.int32), -1)
        self._write("comp_pos", n, none, empty, none.to(torch.int32), -1)
        self._write_latents(n_lat, none, empty, QuantizedLatent(*(None if t is None else t[:, :0].to(dev)
                                                                   for t in latent_like)))
        self._write("fathers", n_lat, none, empty, none.new_zeros(B, 0, self.clustering.neighbor_count)
                    .to(_father_dtype(m, None)), -1)

    def _write(self, name: str, width: int, dest: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
               fill) -> None:
        """Field ``name`` at ``width`` rows, with ``values[b, i]`` written at ``[b, dest[b, i]]`` where ``mask``
        (see :func:`_write_rows`). With a capacity, in place in the field's store (a new store only when ``width``
        differs from the store's: the first write, or a flush past the capacity)."""
        prev = getattr(self, name)
        if not self.capacity:
            setattr(self, name, _write_rows(prev, width, dest, mask, values, fill, self._targets))
            return
        store = self._stores.get(name)
        if store is None or store.shape[1] != width + 1:
            B = dest.shape[0]
            dtype = values.dtype if prev is None else prev.dtype
            store = torch.full((B, width + 1, *values.shape[2:]), fill, dtype=dtype, device=values.device)
            if prev is not None:
                store[:, :prev.shape[1]] = prev
            self._stores[name] = store
            setattr(self, name, store[:, :width])
        _scatter_rows(store, dest, mask, values, width, self._targets)

    def _write_latents(self, width: int, dest: torch.Tensor, mask: torch.Tensor, stored: QuantizedLatent) -> None:
        """The latent fields at ``width`` rows, ``stored`` written at ``dest`` where ``mask`` (host memory with
        ``offload_latents``)."""
        if self.offloaded is not None:      # in place, in host memory
            self.latent = self.offloaded.write(width, dest, mask, stored, exact=bool(self.capacity))
            return
        old = self.latent or QuantizedLatent(None, None, None)
        fields = []
        for name, prev, new in zip(("codes", "scale", "offset"), old, stored):
            if new is None:
                fields.append(None)
                continue
            if not self.capacity:
                fields.append(_write_rows(prev, width, dest, mask, new, 0, self._targets))
                continue
            key = "latent." + name
            store = self._stores.get(key)
            if store is None or store.shape[1] != width + 1:
                store = new.new_zeros(dest.shape[0], width + 1, new.shape[-1])
                if prev is not None:
                    store[:, :prev.shape[1]] = prev
                self._stores[key] = store
                prev = store[:, :width]
            _scatter_rows(store, dest, mask, new, width, self._targets)
            fields.append(prev)
        self.latent = QuantizedLatent(*fields)

    @property
    def width(self) -> int:
        """``N``: the widest row's compressed count (the second dim of :attr:`comp_pos`)."""
        return max(self.counts, default=0)

    def needs_sinks(self, counts: list[int]) -> bool:
        """Whether a flush of ``counts`` is some row's first (then :func:`flush` needs that row's sinks)."""
        return any(n == 0 and c > 0 for n, c in zip(self.counts, counts))

    def valid(self) -> torch.Tensor:
        """``[B, N]`` bool: which compressed offsets hold a token."""
        return self.comp_pos >= 0

    def index_rows(self, index: torch.Tensor, host_index: list[int]) -> None:
        """Keep rows ``index`` (device ``[B']``; ``host_index`` the same as a list), e.g. for beam search."""
        self.counts = [self.counts[i] for i in host_index]
        if self._stores:                 # a reservation: the stores follow the rows, the fields view them again
            self._stores = {key: store[index.to(store.device)] for key, store in self._stores.items()}
            for name in ("comp_pos", "center_x", "center_pos", "fathers"):
                if name in self._stores:
                    setattr(self, name, self._stores[name][:, :-1])
            if self.offloaded is not None and self.latent is not None:
                self.latent = self.offloaded.index_rows(index)
            elif self.latent is not None:
                self.latent = QuantizedLatent(*(None if t is None else self._stores["latent." + f][:, :-1]
                                                for f, t in zip(("codes", "scale", "offset"), self.latent)))
            return
        for name in ("comp_pos", "center_x", "center_pos", "fathers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index.to(value.device)])
        if self.offloaded is not None and self.latent is not None:
            self.latent = self.offloaded.index_rows(index)
        elif self.latent is not None:
            self.latent = QuantizedLatent(*(t if t is None else t[index.to(t.device)] for t in self.latent))

    def bytes_by_part(self) -> dict[str, int]:
        """Bytes held on the compute device, by part (offloaded latents are :meth:`host_bytes`, not here). With a
        reserved capacity this is the whole reservation (allocated up front), not the tokens held so far."""
        def size(*names):
            tensors = [self._stores.get(n, getattr(self, n, None)) for n in names]
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        if self.offloaded is not None:
            latents = {}
        elif any(k.startswith("latent.") for k in self._stores):
            latents = {"latents": sum(t.numel() * t.element_size() for k, t in self._stores.items()
                                      if k.startswith("latent."))}
        else:
            latents = {"latents": self.latent.nbytes() if self.latent is not None else 0}
        return {**latents, "centers": size("center_x", "center_pos"), "father ids": size("fathers"),
                "positions": size("comp_pos")}

    def host_bytes(self) -> int:
        """Bytes held in host memory: the offloaded latents' whole capacity (0 without ``offload_latents``)."""
        return self.offloaded.nbytes() if self.offloaded is not None else 0


def _write_rows(store: torch.Tensor | None, width: int, dest: torch.Tensor, mask: torch.Tensor,
                values: torch.Tensor, fill, targets: dict | None = None) -> torch.Tensor:
    """``store [B, W, *]`` grown to ``width`` with ``values[b, i]`` written at ``[b, dest[b, i]]`` where
    ``mask[b, i]`` (``dest``/``mask`` ``[B, C]``, ``values [B, C, *]``). No host-device sync."""
    B = dest.shape[0]
    dtype = values.dtype if store is None else store.dtype
    out = torch.full((B, width + 1, *values.shape[2:]), fill, dtype=dtype, device=values.device)   # +1: masked
    if store is not None:
        out[:, :store.shape[1]] = store
    _scatter_rows(out, dest, mask, values, width, targets)
    return out[:, :width].contiguous()


def _scatter_rows(out: torch.Tensor, dest: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, dump: int,
                  targets: dict | None = None) -> None:
    """``out[b, dest[b, i]] = values[b, i]`` where ``mask[b, i]``, else into row ``dump`` of ``out`` (a row no
    reader uses): a masked write with no host-device sync. ``out [B, W, *]``, ``dest``/``mask [B, C]``. ``targets``
    (a flush's, while ``dest`` and ``mask`` live): the ``[B, C]`` indices made so far, reused by the next field
    written at the same rows (centers and their positions; the latent fields and father ids)."""
    B, C = dest.shape
    tail = values.shape[2:]
    key = (id(dest), id(mask), dump)
    idx = None if targets is None else targets.get(key)
    if idx is None:
        idx = torch.where(mask, dest, dump)
        if targets is not None:
            targets[key] = idx
    idx = idx.view(B, C, *([1] * len(tail))).expand(B, C, *tail)
    out.scatter_(1, idx, values.to(out.dtype))


def _father_dtype(num_centers: int, stored: torch.Tensor | None) -> torch.dtype:
    """int16 while the centers fit (< 32768; half the bytes), else int32; never narrows again."""
    if num_centers <= torch.iinfo(torch.int16).max and (stored is None or stored.dtype == torch.int16):
        return torch.int16
    return torch.int32


@torch.no_grad()
def flush(state: CompressedState, x: torch.Tensor, pos: torch.Tensor, counts: list[int], projections: Any,
          layer_idx: int, sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
          rows: FlushRows | None = None) -> FlushRows:
    """Compress each row's oldest raw-buffer tokens: raw tokens -> latents + father ids (+ new raw centers).

    Args:
        state: the layer's state, updated in place.
        x: ``[B, C, Dx]`` pre-RoPE ``concat(K, V)`` of the tokens, in arrival order; row ``b`` uses its first
            ``counts[b]`` (``C >= max(counts)``).
        pos: ``[B, C]`` their RoPE positions.
        counts: host list ``[B]``, tokens to compress per row (0: the row does not flush now).
        projections: the compressor (``down(layer, x)``, ``up(layer, z)``, ``dtype``).
        layer_idx: the layer, for ``projections``.
        sinks: ``(x [B, S, Dx], pos [B, S])`` of each row's sink tokens; needed when the flush is a row's first
            (:meth:`CompressedState.needs_sinks`), read only for those rows.
        rows: the index work of another layer's flush of the same tokens (the value it returned), reused when it
            :meth:`~FlushRows.fits`; the tokens' positions must be the same (the caller's promise).

    Returns:
        The :class:`FlushRows` it used (to hand to the next layer).
    """
    cl = state.clustering
    B, C, _ = x.shape
    S, dev = cl.num_sink, x.device
    if len(counts) != B or max(counts, default=0) > C:
        raise ValueError(f"flush: counts {counts} do not fit x of shape {tuple(x.shape)}")
    after = [n + c for n, c in zip(state.counts, counts)]
    if state.capacity and max(after) > state.capacity:    # past the reservation: re-allocate what is needed
        state.capacity = max(after)
    if rows is None or not rows.fits(state, counts, C, dev):
        rows = flush_rows(state, counts, pos)
    width_c = rows.widths[0]
    if state.center_x is None:
        if state.capacity:
            state._write("center_x", width_c, pos[:, :0].long(), pos[:, :0].bool(), x[:, :0], 0)
            state._write("center_pos", width_c, pos[:, :0].long(), pos[:, :0].bool(), pos[:, :0].to(torch.int32), -1)
        else:
            state.center_x = x.new_zeros(B, S, x.shape[-1])
            state.center_pos = torch.full((B, S), -1, dtype=torch.int32, device=dev)
    first = [b for b in range(B) if state.counts[b] == 0 and counts[b] > 0]
    if first:
        if sinks is None:
            raise ValueError(f"flush: rows {first} compress for the first time; pass their sinks")
        sink_x, sink_pos = sinks[0][:, :S].to(state.center_x.dtype), sinks[1][:, :S].to(torch.int32)
        if len(first) < B:   # only these rows take their sinks: the others keep theirs (a device-side choice)
            is_first = (rows.start == 0) & (rows.count > 0)                      # [B, 1]
            sink_x = torch.where(is_first.unsqueeze(-1), sink_x, state.center_x[:, :S])
            sink_pos = torch.where(is_first, sink_pos, state.center_pos[:, :S])
        state.center_x[:, :S] = sink_x
        state.center_pos[:, :S] = sink_pos
    state._targets = rows.targets              # the scatter indices of fields written at the same rows, made once
    try:
        _flush_rows(state, x, rows, projections, layer_idx)
    finally:
        state._targets = None
    return rows


def _flush_rows(state: CompressedState, x: torch.Tensor, rows: FlushRows, projections: Any, layer_idx: int) -> None:
    """:func:`flush`'s writes at ``rows``: centers, positions, fathers, latents."""
    cl = state.clustering
    S, step = cl.num_sink, cl.step
    width_c, width_n, width_l = rows.widths
    pos = rows.pos
    state._write("center_x", width_c, rows.center_at, rows.is_center, x, 0)
    state._write("center_pos", width_c, rows.center_at, rows.is_center, pos, -1)
    state._write("comp_pos", width_n, rows.j, rows.live, pos, -1)
    before = list(state.counts)

    def visible_prefix(i: int, j: int) -> int:   # centers of offsets < start + j (+ the sinks), widest row
        return S + max(-(-(n + j) // step) for n in before)

    used_c = max(cl.num_centers(n) for n in rows.after)     # the centers written so far (a reservation's tail: none)
    centers, center_pos = state.center_x[:, :used_c], state.center_pos[:, :used_c]
    fathers = nearest_centers(x, centers, pos, center_pos, cl.neighbor_count, cl.metric,
                              center_valid=center_pos >= 0, visible_prefix=visible_prefix)   # [B, C, k]
    latent = compress(x, reference_from_fathers(centers, fathers), projections, layer_idx)
    stored = quantize(latent, cl.quant_bits)
    state._write_latents(width_l, rows.dest, rows.other, stored)
    dtype = _father_dtype(width_c, state.fathers)
    if state.fathers is not None and state.fathers.dtype != dtype:     # widened: a new store (rare)
        state._stores.pop("fathers", None)
        state.fathers = state.fathers.to(dtype)
    state._write("fathers", width_l, rows.dest, rows.other, fathers.to(dtype), -1)
    state.counts = list(rows.after)


def all_offsets(state: CompressedState) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pick, ok)`` ``[B, N]`` naming every compressed token of every row (for a rebuild of all of them)."""
    B, N = state.comp_pos.shape
    return torch.arange(N, device=state.comp_pos.device).expand(B, N), state.valid()


@torch.no_grad()
def rebuild(state: CompressedState, pick: torch.Tensor, projections: Any, layer_idx: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild compressed tokens as pre-RoPE ``x = concat(K, V)``: centers as stored, the others
    ``up(latent) + mean(fathers)``.

    Args:
        pick: ``[B, k]`` offsets per row in ``[0, N)`` (entries past a row's count give garbage: mask them).

    Returns:
        ``x [B, k, Dx]`` in ``center_x``'s dtype and ``pos [B, k]`` (long) their RoPE positions.
    """
    cl = state.clustering
    B, k = pick.shape
    step, cx = cl.step, state.center_x
    cidx = (cl.num_sink + pick // step).clamp(max=cx.shape[1] - 1)
    x = cx.gather(1, cidx.unsqueeze(-1).expand(B, k, cx.shape[-1]))
    if state.fathers is not None and state.fathers.shape[1] > 0:
        row = (pick - pick // step - 1).clamp(0, state.fathers.shape[1] - 1)
        latent = dequantize(state.latent.select(row), projections.dtype)
        fathers = state.fathers.gather(1, row.unsqueeze(-1).expand(B, k, state.fathers.shape[-1])).long()
        rebuilt = reconstruct(latent, reference_from_fathers(cx, fathers), projections, layer_idx)
        x = torch.where((pick % step == 0).unsqueeze(-1), x, rebuilt)
    return x, state.comp_pos.gather(1, pick).long()


def split_kv(x: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, n, Dx]`` -> pre-RoPE ``K [B, n, Hkv, D]`` and ``V [B, n, Hkv, Dv]`` (the layout of ``concat(K, V)``)."""
    B, n, _ = x.shape
    k = x[..., : kv_heads * head_dim].reshape(B, n, kv_heads, head_dim)
    return k, x[..., kv_heads * head_dim:].reshape(B, n, kv_heads, -1)


def rms_norm_params(k_norm: Any) -> tuple[torch.Tensor | None, float]:
    """``(weight [D], eps)`` of a per-head RMS key norm (Qwen3's ``k_norm``: ``w * k / sqrt(mean(k^2) + eps)``), or
    ``(None, 0.0)`` for none. The rebuild kernel applies it itself, so it needs the parameters, not the module."""
    if k_norm is None:
        return None, 0.0
    eps = getattr(k_norm, "variance_epsilon", getattr(k_norm, "eps", None))
    weight = getattr(k_norm, "weight", None)
    if weight is None or eps is None:
        raise ValueError(f"deltakv rebuilds keys behind an RMS k_norm (weight and variance_epsilon/eps); got "
                         f"{type(k_norm).__name__}, which has no such parameters")
    return weight, float(eps)


def rebuild_kv(state: CompressedState, pick: torch.Tensor, projections: Any, layer_idx: int, kv_heads: int,
               head_dim: int, rope: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               k_norm: Any = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
               cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None, latents: torch.Tensor | None = None,
               fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Picked compressed tokens as attention reads them (``up(latent) + mean(fathers)``, centers as stored; then
    ``k_norm`` (Qwen3) and RoPE at each token's position), through the fused kernel entry
    :func:`sparse_hf.kernels.deltakv_rebuild_kv` (Triton on CUDA, its torch reference elsewhere).

    Args:
        pick: ``[B, k]`` offsets per row (``-1`` or past a row's count: garbage there, the caller masks it).
        rope: ``rope(like [B, k, Hkv, Dv], pos [B, k]) -> (cos, sin)`` each ``[B, k, D]`` (the model's rotary
            embedding); k_norm: the per-head RMS key norm module, or ``None``.
        out: ``(k_out [B, Hkv, k, D], v_out [B, Hkv, k, Dv])`` scratch slots to write into (e.g. views into a
            preallocated buffer, for a static-shape decode step); new tensors in ``center_x``'s dtype if ``None``.
        cos_sin: ``rope``'s ``(cos, sin)`` at the picks' positions when the caller has them already (layers that
            rebuild the same picks share one); computed here if ``None``.
        latents: ``[B, k, r]`` the picks' latents already gathered and dequantised in ``projections.dtype`` (e.g. by
            :class:`~sparse_hf.deltakv.offload.LatentPrefetch`); gathered from ``state.latent`` if ``None``.
        fused: with a linear ``up`` (``projections.linear_up``) and Triton running, rebuild in one kernel
            (:func:`sparse_hf.kernels.deltakv_fused.deltakv_rebuild_fused`); ignored with ``latents``.

    Returns:
        ``K [B, Hkv, k, D]``, ``V [B, Hkv, k, Dv]`` (``out`` when given) and ``pos [B, k]`` (long; ``None`` when
        ``cos_sin`` is given: the caller placed the picks already).
    """
    cl = state.clustering
    B, k = pick.shape
    cx = state.center_x
    dv = cx.shape[-1] // kv_heads - head_dim
    if out is None:
        out = (cx.new_empty(B, kv_heads, k, head_dim), cx.new_empty(B, kv_heads, k, dv))
    if cos_sin is None:
        pos = state.comp_pos.gather(1, pick.clamp(min=0)).long()
        cos, sin = rope(out[1].transpose(1, 2), pos)
    else:                                    # the caller's tables: no gather of positions (a decode step's launches)
        pos, (cos, sin) = None, cos_sin
    lat = state.latent or QuantizedLatent(None, None, None)
    weight, eps = rms_norm_params(k_norm)
    if latents is not None and state.fathers is not None and state.fathers.shape[1] > 0:
        up_out = projections.up(layer_idx, latents).contiguous()
        keys, values = deltakv_writeback(pick, up_out, state.fathers, cx, cl.step, cl.num_sink, cos.contiguous(),
                                         sin.contiguous(), out[0], out[1], weight, eps)
        return keys, values, pos
    linear = projections.linear_up(layer_idx) if fused and hasattr(projections, "linear_up") else None
    keys, values = deltakv_rebuild_kv(pick, lat.codes, lat.scale, lat.offset, state.fathers, cx,
                                      lambda z: projections.up(layer_idx, z), projections.dtype, cl.step,
                                      cl.num_sink, cos.contiguous(), sin.contiguous(), out[0], out[1], weight, eps,
                                      up_linear=linear)
    return keys, values, pos
