"""One validated configuration object for every sparse-KV knob.

Knob names follow the reference implementation's README (Sparse-vLLM / DeltaKV); see
``docs/methods.md`` for what each one means per method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Filter (full-attention) layers of the reference HF defaults; entries beyond the model's depth are dropped.
DEFAULT_FULL_ATTN_LAYERS = (0, 1, 2, 3, 8, 16, 22)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_budget(name: str, value: Any) -> None:
    """A budget is a non-negative int (a count) or a float in (0, 1] (a fraction)."""
    if _is_int(value):
        if value < 0:
            raise ValueError(f"{name}={value}: a token count must be >= 0")
    elif isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name}={value}: a fraction must lie in (0, 1]; pass an int for a token count")
    else:
        raise ValueError(f"{name}={value!r}: expected an int (count) or a float in (0, 1] (fraction)")


def parse_layer_list(value: Any) -> tuple[int, ...] | None:
    """Parse ``"0,1,2"`` or ``[0, 1, 2]`` into a sorted tuple of unique layer indices."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            layers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"full_attn_layers={value!r}: expected comma-separated integers like '0,1,2'") from None
    elif isinstance(value, (list, tuple)):
        if not all(_is_int(v) for v in value):
            raise ValueError(f"full_attn_layers={value!r}: expected a list of integers")
        layers = list(value)
    else:
        raise ValueError(f"full_attn_layers={value!r}: expected a '0,1,2' string or a list of ints")
    if any(layer < 0 for layer in layers):
        raise ValueError(f"full_attn_layers={value!r}: layer indices must be >= 0")
    return tuple(sorted(set(layers)))


@dataclass
class SparseConfig:
    """Every knob of every method, validated on construction.

    Budgets (``num_top_tokens``, ``num_top_tokens_in_prefill``) are an ``int`` token count or a ``float`` in
    (0, 1] meaning a fraction of the prompt (eviction methods) or of the current length (OmniKV/DeltaKV).
    """

    # -- shared budgets -------------------------------------------------------------------------------------
    num_sink_tokens: int = 8
    num_recent_tokens: int = 128
    num_top_tokens: int | float = 1024
    num_top_tokens_in_prefill: int | float = 8192
    # -- SnapKV / PyramidKV ----------------------------------------------------------------------------------
    window_size: int = 32
    pool_kernel_size: int = 7
    snapkv_num_full_layers: int = 0
    pyramid_start_layer: int = 0
    pyramid_start_ratio: float = 0.6
    pyramid_least_ratio: float = 0.01
    pyramid_least_layer: int | None = None
    # -- OmniKV / DeltaKV filter layers -----------------------------------------------------------------------
    full_attn_layers: str | list[int] | tuple[int, ...] | None = None
    chunk_prefill_accel_omnikv: bool = False
    # -- DeltaKV ------------------------------------------------------------------------------------------------
    compressor: Any = None
    deltakv_path: str | None = None
    kv_quant_bits: int = 0                       # DeltaKV latents: 0 = compressor dtype, 8 = int8, 4 = packed int4
    cluster_ratio: float | None = None           # None: the compressor's training value, else 0.1
    deltakv_neighbor_count: int | None = None    # None: the compressor's training value, else 1
    cluster_metric: str | None = None            # "l2" | "dot" | "cosine"; None: the compressor's training value, else l2
    # -- speed ----------------------------------------------------------------------------------------------------
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        for name in ("num_sink_tokens", "num_recent_tokens", "window_size", "snapkv_num_full_layers",
                     "pyramid_start_layer"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name}={value!r}: expected an int >= 0")
        _check_budget("num_top_tokens", self.num_top_tokens)
        _check_budget("num_top_tokens_in_prefill", self.num_top_tokens_in_prefill)
        if not _is_int(self.pool_kernel_size) or self.pool_kernel_size < 1 or self.pool_kernel_size % 2 == 0:
            raise ValueError(f"pool_kernel_size={self.pool_kernel_size!r}: expected an odd int >= 1")
        if self.window_size < 1:
            raise ValueError("window_size must be >= 1")
        for name in ("pyramid_start_ratio", "pyramid_least_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value!r}: expected a ratio in (0, 1]")
        if self.pyramid_least_layer is not None and (not _is_int(self.pyramid_least_layer)
                                                     or self.pyramid_least_layer < 0):
            raise ValueError(f"pyramid_least_layer={self.pyramid_least_layer!r}: expected an int >= 0 or None")
        self.full_attn_layers = parse_layer_list(self.full_attn_layers)
        if self.kv_quant_bits not in (0, 4, 8):
            raise ValueError(f"kv_quant_bits={self.kv_quant_bits!r}: supported values are 0 (no quantisation), 8 and 4")
        if self.cluster_ratio is not None and (not isinstance(self.cluster_ratio, (int, float))
                                               or not 0.0 < self.cluster_ratio <= 1.0):
            raise ValueError(f"cluster_ratio={self.cluster_ratio!r}: expected a ratio in (0, 1]")
        if self.deltakv_neighbor_count is not None and (not _is_int(self.deltakv_neighbor_count)
                                                        or self.deltakv_neighbor_count < 1):
            raise ValueError(f"deltakv_neighbor_count={self.deltakv_neighbor_count!r}: expected an int >= 1")
        if self.cluster_metric is not None and self.cluster_metric not in ("l2", "dot", "cosine"):
            raise ValueError(f"cluster_metric={self.cluster_metric!r}: expected 'l2', 'dot' or 'cosine'")

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def knob_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, knobs: dict | None) -> "SparseConfig":
        """Build from a ``cache_config`` dict; an unknown key raises ``ValueError`` listing the valid knobs."""
        knobs = dict(knobs or {})
        valid = cls.knob_names()
        unknown = sorted(k for k in knobs if k not in valid)
        if unknown:
            raise ValueError(f"unknown sparse-hf knob(s) {unknown}; valid knobs are: {', '.join(valid)}")
        return cls(**knobs)

    def resolved_full_attn_layers(self, num_layers: int) -> tuple[int, ...]:
        """Filter layers for a model with ``num_layers`` layers (defaults: the reference's, cut to the depth)."""
        if self.full_attn_layers is None:
            return tuple(layer for layer in DEFAULT_FULL_ATTN_LAYERS if layer < num_layers)
        bad = [layer for layer in self.full_attn_layers if layer >= num_layers]
        if bad:
            raise ValueError(f"full_attn_layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        return self.full_attn_layers


def resolve_count(budget: int | float, n: int) -> int:
    """A budget as a token count for a sequence of ``n`` tokens: ints are counts, floats fractions of ``n``."""
    if isinstance(budget, float):
        return int(n * budget)
    return int(budget)
