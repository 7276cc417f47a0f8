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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparse_hf.kernels import deltakv_rebuild_kv, deltakv_writeback

from .clustering import METRICS, compress, nearest_centers, reconstruct, reference_from_fathers
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
        for name in ("comp_pos", "center_x", "center_pos", "fathers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index.to(value.device)])
        if self.offloaded is not None and self.latent is not None:
            self.latent = self.offloaded.index_rows(index)
        elif self.latent is not None:
            self.latent = QuantizedLatent(*(t if t is None else t[index.to(t.device)] for t in self.latent))

    def bytes_by_part(self) -> dict[str, int]:
        """Bytes held on the compute device, by part (offloaded latents are :meth:`host_bytes`, not here)."""
        def size(*tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        latents = {} if self.offloaded is not None else {
            "latents": self.latent.nbytes() if self.latent is not None else 0}
        return {**latents, "centers": size(self.center_x, self.center_pos), "father ids": size(self.fathers),
                "positions": size(self.comp_pos)}

    def host_bytes(self) -> int:
        """Bytes held in host memory: the offloaded latents' whole capacity (0 without ``offload_latents``)."""
        return self.offloaded.nbytes() if self.offloaded is not None else 0


def _write_rows(store: torch.Tensor | None, width: int, dest: torch.Tensor, mask: torch.Tensor,
                values: torch.Tensor, fill) -> torch.Tensor:
    """``store [B, W, *]`` grown to ``width`` with ``values[b, i]`` written at ``[b, dest[b, i]]`` where
    ``mask[b, i]`` (``dest``/``mask`` ``[B, C]``, ``values [B, C, *]``). No host-device sync."""
    B, C = dest.shape
    tail = values.shape[2:]
    dtype = values.dtype if store is None else store.dtype
    out = torch.full((B, width + 1, *tail), fill, dtype=dtype, device=values.device)   # +1: a column for masked
    if store is not None:
        out[:, :store.shape[1]] = store
    idx = torch.where(mask, dest, width).view(B, C, *([1] * len(tail))).expand(B, C, *tail)
    out.scatter_(1, idx, values.to(dtype))
    return out[:, :width].contiguous()


def _father_dtype(num_centers: int, stored: torch.Tensor | None) -> torch.dtype:
    """int16 while the centers fit (< 32768; half the bytes), else int32; never narrows again."""
    if num_centers <= torch.iinfo(torch.int16).max and (stored is None or stored.dtype == torch.int16):
        return torch.int16
    return torch.int32


@torch.no_grad()
def flush(state: CompressedState, x: torch.Tensor, pos: torch.Tensor, counts: list[int], projections: Any,
          layer_idx: int, sinks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
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
    """
    cl = state.clustering
    B, C, _ = x.shape
    S, step, dev = cl.num_sink, cl.step, x.device
    if len(counts) != B or max(counts, default=0) > C:
        raise ValueError(f"flush: counts {counts} do not fit x of shape {tuple(x.shape)}")
    after = [n + c for n, c in zip(state.counts, counts)]
    if state.center_x is None:
        state.center_x = x.new_zeros(B, S, x.shape[-1])
        state.center_pos = torch.full((B, S), -1, dtype=torch.int32, device=dev)
    first = [b for b in range(B) if state.counts[b] == 0 and counts[b] > 0]
    if first:
        if sinks is None:
            raise ValueError(f"flush: rows {first} compress for the first time; pass their sinks")
        rows = torch.tensor(first, device=dev)
        state.center_x[rows, :S] = sinks[0][rows, :S].to(state.center_x.dtype)
        state.center_pos[rows, :S] = sinks[1][rows, :S].to(torch.int32)
    start = torch.tensor(state.counts, device=dev).view(B, 1)
    j = start + torch.arange(C, device=dev).view(1, C)                        # [B, C] offsets
    live = torch.arange(C, device=dev).view(1, C) < torch.tensor(counts, device=dev).view(B, 1)
    is_center = live & (j % step == 0)
    other = live & ~is_center
    width_c = max(cl.num_centers(n) for n in after)
    state.center_x = _write_rows(state.center_x, width_c, S + j // step, is_center, x, 0)
    pos = pos.to(torch.int32)
    state.center_pos = _write_rows(state.center_pos, width_c, S + j // step, is_center, pos, -1)
    state.comp_pos = _write_rows(state.comp_pos, max(after), j, live, pos, -1)
    before = list(state.counts)

    def visible_prefix(i: int, j: int) -> int:   # centers of offsets < start + j (+ the sinks), widest row
        return S + max(-(-(n + j) // step) for n in before)

    fathers = nearest_centers(x, state.center_x, pos, state.center_pos, cl.neighbor_count, cl.metric,
                              center_valid=state.center_pos >= 0, visible_prefix=visible_prefix)   # [B, C, k]
    latent = compress(x, reference_from_fathers(state.center_x, fathers), projections, layer_idx)
    stored = quantize(latent, cl.quant_bits)
    width_l = max(cl.num_latents(n) for n in after)
    dest = j - j // step - 1
    if state.offloaded is not None:      # in place, in host memory
        state.latent = state.offloaded.write(width_l, dest, other, stored)
    else:
        old = state.latent or QuantizedLatent(None, None, None)
        state.latent = QuantizedLatent(*(None if new is None else _write_rows(prev, width_l, dest, other, new, 0)
                                         for prev, new in zip(old, stored)))
    dtype = _father_dtype(width_c, state.fathers)
    prev = None if state.fathers is None else state.fathers.to(dtype)
    state.fathers = _write_rows(prev, width_l, dest, other, fathers.to(dtype), -1)
    state.counts = after


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
               cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None, latents: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    keys, values = deltakv_rebuild_kv(pick, lat.codes, lat.scale, lat.offset, state.fathers, cx,
                                      lambda z: projections.up(layer_idx, z), projections.dtype, cl.step,
                                      cl.num_sink, cos.contiguous(), sin.contiguous(), out[0], out[1], weight, eps)
    return keys, values, pos
