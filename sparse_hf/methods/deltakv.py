"""DeltaKV: old tokens stored as low-dimensional residuals against nearby raw reference tokens
(arXiv 2602.08005). Token selection is OmniKV's: filter layers stay raw and choose which compressed
tokens the other layers reconstruct."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_optional_positive, check_optional_ratio, knob
from ..deltakv.clustering import center_step
from .base import CompressionMethod
from .omnikv import OmniKV, OmniKVConfig


def check_quant_bits(name: str, value) -> int:
    if value not in (0, 4, 8) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: supported values are 0 (no quantisation), 8 and 4")
    return value


@dataclass(frozen=True)
class DeltaKVConfig(OmniKVConfig):
    """OmniKV's knobs plus the compressed storage's. ``cluster_ratio`` and ``deltakv_neighbor_count`` default
    (``None``) to the values the compressor was trained with: the cache fills them in with :meth:`replace`, which
    returns a new config. The compressor itself (``compressor`` / ``deltakv_path``) is a runtime option."""

    method_name = "deltakv"

    kv_quant_bits: int = knob(0, check_quant_bits, "latents: 0 = compressor dtype, 8 = int8, 4 = packed int4")
    cluster_ratio: float | None = knob(None, check_optional_ratio, "None: the compressor's training value, else 0.1")
    deltakv_neighbor_count: int | None = knob(None, check_optional_positive,
                                              "None: the compressor's training value, else 1")


class DeltaKV(OmniKV, CompressionMethod):
    """Per non-filter layer: sink tokens stay raw; a raw buffer of recent tokens is flushed once it holds
    ``2 * num_recent_tokens``; of the flushed tokens every ``1/cluster_ratio``-th is kept raw as a *center*
    and every other one is stored as ``latent = down(x) - down(ref)`` with ``ref`` the mean of its
    ``deltakv_neighbor_count`` nearest earlier centers (x = concat(K, V) before RoPE). At decode only the
    compressed tokens the filter layer ranks in the top ``num_top_tokens`` are rebuilt as ``up(latent) + ref``
    (RoPE re-applied at their positions); the layer attends to sinks + rebuilt + raw buffer.
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

    @property
    def step(self) -> int:
        """Distance between centers, from ``cluster_ratio`` (which the cache may take from the compressor)."""
        return center_step(self.config.cluster_ratio or 0.1)

    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if not self.is_full(i)]

    def flush_count(self, buffered: int) -> int:
        """How many of the oldest ``buffered`` raw buffer tokens to compress now (0 until it holds 2x recent)."""
        recent = self.config.num_recent_tokens
        if buffered < 2 * recent:
            return 0
        return (buffered - recent) // recent * recent

    def is_center(self, rel: torch.Tensor) -> torch.Tensor:
        """Whether compressed-region tokens at offsets ``rel`` (from the region's start) are centers."""
        return rel % self.step == 0

    def pick(self, scores: torch.Tensor | None, num_compressed: int, length: int) -> torch.Tensor | None:
        """Compressed tokens to rebuild at a decode step.

        Args:
            scores: ``[B, N]`` the filter layer's scores of the compressed region, or ``None`` (no selection).
            num_compressed: ``N``; length: the logical length (fraction budgets resolve against it).

        Returns:
            ``[B, k]`` offsets into the compressed region, or ``None`` for all of them.
        """
        top = self.top_count(length, prefill=False)
        if scores is None or top >= num_compressed:
            return None
        return scores.topk(top, dim=-1).indices
