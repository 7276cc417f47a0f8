"""DeltaKV: old tokens stored as low-dimensional residuals against nearby raw reference tokens
(arXiv 2602.08005). Token selection is OmniKV's: filter layers stay raw and choose which compressed
tokens the other layers reconstruct."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import check_flag, check_optional_positive, check_optional_ratio, knob, resolve_counts
from ..deltakv.clustering import METRICS, center_step
from ..deltakv.state import Clustering
from .base import CompressionMethod
from .omnikv import OmniKV, OmniKVConfig
from .selection import top_priority


def check_optional_metric(name: str, value) -> str | None:
    if value is not None and value not in METRICS:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(METRICS)} (or None: the compressor's)")
    return value


def check_quant_bits(name: str, value) -> int:
    if value not in (0, 4, 8) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: supported values are 0 (no quantisation), 8 and 4")
    return value


@dataclass(frozen=True)
class DeltaKVConfig(OmniKVConfig):
    """OmniKV's knobs plus the compressed storage's. Every knob the compressor's training fixes
    (``num_sink_tokens``, ``cluster_ratio``, ``deltakv_neighbor_count``, ``cluster_metric``) defaults to the value
    it was trained with, unless the caller sets it: the cache builds a new config with :meth:`replace`. The
    compressor itself (``compressor`` / ``deltakv_path``) is a runtime option."""

    method_name = "deltakv"

    kv_quant_bits: int = knob(0, check_quant_bits, "latents: 0 = compressor dtype, 8 = int8, 4 = packed int4")
    cluster_ratio: float | None = knob(None, check_optional_ratio, "None: the compressor's training value, else 0.1")
    deltakv_neighbor_count: int | None = knob(None, check_optional_positive,
                                              "None: the compressor's training value, else 1")
    cluster_metric: str | None = knob(None, check_optional_metric,
                                      "l2 | dot | cosine; None: the compressor's training value, else l2")
    offload_latents: bool = knob(False, check_flag,
                                 "keep the latents (and their scales) in pinned host memory; a decode step reads only "
                                 "the picked ones across PCIe (HF path and engine, CUDA graphs included)")
    # Off: on an H200 (run N, 2026-12-02, docs/benchmarks.md) it was slower than gather + cuBLAS + writeback
    # (313 vs 152 us a layer at 13,039 picks; decode 0.74-0.87x); its bf16 results agreed to 0.016.
    fused_rebuild: bool = knob(False, check_flag,
                               "HF path, linear up, CUDA: a decode step rebuilds its picks in one Triton kernel "
                               "(dequantise, up GEMM, fathers' mean, RoPE) instead of gather + cuBLAS + writeback "
                               "(measured slower on an H200: kept for experiments)")


#: Serving knobs that a compressor's training fixes, and their value when the compressor records none.
TRAINED_KNOB_FALLBACKS = {"cluster_ratio": 0.1, "deltakv_neighbor_count": 1, "cluster_metric": "l2"}


class DeltaKV(OmniKV, CompressionMethod):
    """Per non-filter layer and per row: the row's first ``num_sink_tokens`` tokens stay raw; a raw buffer of
    recent tokens is flushed once it holds ``2 * num_recent_tokens``; of the flushed tokens every
    ``1/cluster_ratio``-th is kept raw as a *center* and every other one is stored as
    ``latent = down(x) - down(ref)`` with ``ref`` the mean of its ``deltakv_neighbor_count`` nearest earlier centers
    (by ``cluster_metric``; x = concat(K, V) before RoPE). At decode only the compressed tokens the filter layer
    ranks in the top ``num_top_tokens`` are rebuilt as ``up(latent) + ref`` (RoPE re-applied at their positions);
    the layer attends to sinks + rebuilt + raw buffer.
    """

    name = "deltakv"
    family = "compress"
    config_class = DeltaKVConfig

    @classmethod
    def check_runtime(cls, runtime) -> None:
        if runtime.compressor is None and not runtime.deltakv_path:
            raise ValueError("deltakv needs a compressor: cache_config={'compressor': DeltaKVCompressor(...)} or "
                             "{'deltakv_path': 'dir-or-hub-id'}")

    def validate(self) -> None:
        super().validate()
        if self.config.num_recent_tokens < 1:
            raise ValueError("deltakv needs num_recent_tokens >= 1 (the raw buffer is flushed in multiples of it)")
        center_step(self.config.cluster_ratio or 0.1)   # raises for a ratio outside (0, 1]

    @staticmethod
    def with_compressor_defaults(config, trained: dict[str, Any], explicit: set[str]):
        """A new config in which every knob the compressor's training fixed (``trained``: serving knob -> value,
        e.g. ``{"num_sink_tokens": 16, "cluster_metric": "cosine"}``) replaces the caller's unless the caller set
        it (``explicit``); unset knobs the training does not record get :data:`TRAINED_KNOB_FALLBACKS`.
        ``config`` itself is not changed."""
        changes = {k: v for k, v in trained.items() if k not in explicit and hasattr(config, k)}
        for knob, fallback in TRAINED_KNOB_FALLBACKS.items():
            if knob not in changes and hasattr(config, knob) and getattr(config, knob) is None:
                changes[knob] = fallback
        return config.replace(**changes) if changes else config

    @property
    def step(self) -> int:
        """Distance between centers, from ``cluster_ratio`` (which the cache may take from the compressor)."""
        return center_step(self.config.cluster_ratio or 0.1)

    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if not self.is_full(i)]

    def flush_count(self, buffered: int) -> int:
        """How many of a row's oldest ``buffered`` raw buffer tokens to compress now (0 until it holds 2x recent)."""
        recent = self.config.num_recent_tokens
        if buffered < 2 * recent:
            return 0
        return (buffered - recent) // recent * recent

    def clustering(self) -> Clustering:
        """The per-layer knobs of :mod:`sparse_hf.deltakv.state` (sinks, center step, fathers, metric, latent bits)."""
        c = self.config
        return Clustering(num_sink=c.num_sink_tokens, step=self.step,
                          neighbor_count=c.deltakv_neighbor_count or TRAINED_KNOB_FALLBACKS["deltakv_neighbor_count"],
                          metric=c.cluster_metric or TRAINED_KNOB_FALLBACKS["cluster_metric"], quant_bits=c.kv_quant_bits,
                          offload_latents=c.offload_latents)

    def pick(self, scores: torch.Tensor | None, num_compressed: int, length: int) -> torch.Tensor | None:
        """Compressed tokens to rebuild at a decode step, per row, without host-device syncs.

        Args:
            scores: ``[B, N]`` the filter layer's scores of each row's compressed tokens (offset order; ``-inf``
                past a row's count), or ``None`` (no selection).
            num_compressed: ``N``, the widest row's count.
            length: the logical length (a fraction budget sizes the output against it).

        Returns:
            ``[B, k]`` offsets into each row's compressed tokens, best first (a row with fewer than ``k`` tokens
            gets absent offsets last; with a fraction budget see :meth:`over_row_budget`), or ``None`` for all.
        """
        top = self.top_count(length, prefill=False)
        if scores is None or top >= num_compressed:
            return None
        return top_priority(scores, top)      # ties (pooled scores make plateaus) go to the earlier token, any batch

    def pick_static(self, scores: torch.Tensor, width: int, length: torch.Tensor, padding: torch.Tensor,
                    compressed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pick` with a static shape, for a decode step a CUDA graph can capture (no host value of the length).

        Args:
            scores: ``[B, N]`` as for :meth:`pick`.
            width: ``k``, a host int fixed between flushes, with ``min(N, top) <= width <= N`` for the ``top`` of every
                length the step serves (the cache re-sizes it eagerly when that no longer holds).
            length: ``[1]`` (or ``[B]``) long device tensor, the logical length (padding included).
            padding: ``[B]`` long, each row's padding columns.
            compressed: ``[1]`` long device tensor, the widest row's compressed count, when ``scores`` is wider
                than that (a state with a reserved capacity, its tail ``-inf``); ``None``: ``N``.

        Returns:
            ``pick [B, width]`` offsets (best first, except under a count budget that keeps every rank: then in no
            particular order) and ``keep [B, width]`` bool: the ranks :meth:`pick` plus
            :meth:`over_row_budget` would read (all of them when the budget covers every compressed token).
        """
        B, N = scores.shape
        budget = self.config.num_top_tokens
        if not isinstance(budget, float) and width <= budget:
            # a count budget covers every rank of every row (rank < width <= budget = each row's budget): the masks
            # below would be all True; one fill instead of their ~6 launches per pick (4 picks a step, CUDA graph)
            return top_priority(scores, width), torch.ones(B, width, dtype=torch.bool, device=scores.device)
        # best first, ties to the earlier token (a plain topk's tie rule depends on the row's width in the batch,
        # and pool_kernel_size makes ties common): the masks below keep leading ranks
        pick = top_priority(scores, width)
        top = resolve_counts(budget, length.expand(B))                         # [B], the same in every row
        per_row = resolve_counts(budget, length - padding)                     # [B], each row's own budget
        rank = torch.arange(width, device=scores.device).view(1, width)
        held = N if compressed is None else compressed
        return pick, (rank < per_row.view(B, 1)) | (top >= held).view(B, 1)

    def over_row_budget(self, padding: torch.Tensor, length: int) -> torch.Tensor | None:
        """``[B, k]`` bool: which of :meth:`pick`'s ranks lie past each row's own budget, a fraction of that row's
        real length ``length - padding[b]`` (so a row's picks do not depend on the batch's padding); ``None`` for
        a count budget, which is the same for every row."""
        budget = self.config.num_top_tokens
        if not isinstance(budget, float):
            return None
        top = self.top_count(length, prefill=False)
        per_row = ((length - padding).double() * budget).long()
        return torch.arange(top, device=padding.device).view(1, top) >= per_row.view(-1, 1)
