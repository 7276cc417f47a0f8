"""The DeltaKV compressor as a plain ``nn.Module``: one learned down/up projection pair per layer.

DeltaKV stores an old token as ``latent = down(x) - down(ref)`` and rebuilds it as ``up(latent) + ref``, where
``x = concat(K, V)`` over all KV heads **before RoPE** (Qwen3: also before ``k_norm``), so
``D = 2 * num_key_value_heads * head_dim``. The layout of ``x`` is ``[K head 0 .. K head n-1, V head 0 .. V head
n-1]``, each head ``head_dim`` wide: exactly ``torch.cat([k_proj(h), v_proj(h)], -1)``.

This module is the core (no Transformers): the cache math, the trainer and the engine call :meth:`down`/:meth:`up`.
The Hub-facing :class:`~sparse_hf.deltakv.compressor.DeltaKVCompressor` (``from_pretrained``, ``push_to_hub``,
model card) wraps it and shares its parameters (same state-dict keys: ``layers.{i}.down/up...``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Projection types, and the aliases the reference accepts for them.
PROJECTION_TYPES = ("linear", "mlp_gelu", "mlp_swiglu")
_ALIASES = {"linear": "linear", "mlp": "mlp_gelu", "gelu": "mlp_gelu", "mlp_gelu": "mlp_gelu",
            "swiglu": "mlp_swiglu", "mlp_swiglu": "mlp_swiglu"}

#: Training knobs (as the trainer records them) -> the serving knob each one sets by default.
TRAINING_TO_SERVING = {"num_sink": "num_sink_tokens", "cluster_ratio": "cluster_ratio",
                       "neighbor_count": "deltakv_neighbor_count", "metric": "cluster_metric"}


def normalize_projection_type(kind: Any) -> str:
    """``'gelu'``/``'mlp'`` -> ``'mlp_gelu'``, ``'swiglu'`` -> ``'mlp_swiglu'``; anything unknown raises ValueError."""
    name = str(kind).strip().lower()
    if name not in _ALIASES:
        raise ValueError(f"unknown compressor projection type {kind!r}; expected one of {', '.join(PROJECTION_TYPES)}")
    return _ALIASES[name]


class SwiGLUProjection(nn.Module):
    """``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x).chunk(2)``: [..., in] -> [..., out] through hidden ``h``."""

    def __init__(self, in_size: int, hidden: int, out_size: int, bias: bool):
        super().__init__()
        self.w12 = nn.Linear(in_size, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def build_projection(kind: str, in_size: int, out_size: int, hidden: int, bias: bool) -> nn.Module:
    """One projection [..., in] -> [..., out]; parameter names match the reference (``.0/.2``, ``.w12/.w3``)."""
    kind = normalize_projection_type(kind)
    if kind == "linear":
        return nn.Linear(in_size, out_size, bias=bias)
    if kind == "mlp_gelu":
        return nn.Sequential(nn.Linear(in_size, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out_size, bias=bias))
    return SwiGLUProjection(in_size, hidden, out_size, bias)


class LayerCompressor(nn.Module):
    """The ``down`` [..., D] -> [..., latent] and ``up`` [..., latent] -> [..., D] pair of one layer."""

    def __init__(self, kv_dim: int, latent: int, down_type: str, up_type: str, down_hidden: int, up_hidden: int,
                 bias: bool):
        super().__init__()
        self.down = build_projection(down_type, kv_dim, latent, down_hidden, bias)
        self.up = build_projection(up_type, latent, kv_dim, up_hidden, bias)


class DeltaKVProjections(nn.Module):
    """Per-layer DeltaKV projections; ``layers[str(i)]`` holds layer ``i``'s :class:`LayerCompressor`.

    Args:
        num_layers, kv_heads, head_dim: the KV shape of the model it serves (``kv_dim = 2 * kv_heads * head_dim``).
        latent: the latent width. layer_indices: the compressed layers.
        down_type, up_type: see :data:`PROJECTION_TYPES`; down_hidden, up_hidden: MLP hidden widths.
        training: the knobs it was trained with (``num_sink``, ``cluster_ratio``, ``neighbor_count``, ``metric``;
            see :data:`TRAINING_TO_SERVING`); serving takes them as defaults.
        filter_layers: the filter layers calibrated for these projections (``None``: none); serving's default
            ``full_attn_layers``.

    Inputs are cast to the projections' dtype, and outputs stay in it: callers cast back to their KV dtype.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, latent: int, layer_indices: list[int],
                 down_type: str = "linear", up_type: str = "linear", down_hidden: int = 0, up_hidden: int = 0,
                 bias: bool = True, training: dict | None = None, filter_layers: list[int] | None = None):
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = int(num_layers), int(kv_heads), int(head_dim)
        self.kv_dim, self.latent_size = 2 * self.kv_heads * self.head_dim, int(latent)
        self.layer_indices = [int(i) for i in layer_indices]
        self.training_knobs = dict(training or {})
        self.filter_layers = None if filter_layers is None else [int(i) for i in filter_layers]
        self.layers = nn.ModuleDict({str(i): LayerCompressor(self.kv_dim, self.latent_size, down_type, up_type,
                                                             down_hidden, up_hidden, bias)
                                     for i in self.layer_indices})

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _layer(self, layer_idx: int) -> LayerCompressor:
        key = str(int(layer_idx))
        if key not in self.layers:
            raise ValueError(f"layer {layer_idx} has no compressor; compressed layers: {self.layer_indices}")
        return self.layers[key]

    def _cast(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if x.shape[-1] != width:
            raise ValueError(f"{what} must have last dim {width}, got shape {tuple(x.shape)}")
        return x.to(self.dtype)

    def down(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """Project concat(K, V) [..., D] to the latent space [..., latent]."""
        return self._layer(layer_idx).down(self._cast(x, self.kv_dim, "down's input concat(K, V)"))

    def up(self, layer_idx: int, z: torch.Tensor) -> torch.Tensor:
        """Project a latent [..., latent] back to concat(K, V) space [..., D]."""
        return self._layer(layer_idx).up(self._cast(z, self.latent_size, "up's input latent"))

    def linear_up(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight [D, latent], bias [D] or None)`` of layer ``layer_idx``'s ``up`` when it is one linear map (a
        fused rebuild kernel can then run the GEMM itself), else ``None``."""
        up = self._layer(layer_idx).up
        return (up.weight, up.bias) if isinstance(up, nn.Linear) else None

    def forward(self, x: torch.Tensor, layer_idx: int = 0) -> torch.Tensor:
        """Plain autoencoding ``up(down(x))`` of one layer, [..., D] -> [..., D] (no reference subtracted)."""
        return self.up(layer_idx, self.down(layer_idx, x))

    def check_shape(self, num_layers: int, kv_heads: int, head_dim: int, trained_for: str | None = None) -> None:
        """Raise ValueError unless these projections were made for a model with this KV shape."""
        problems = []
        if self.num_layers != num_layers:
            problems.append(f"it has {self.num_layers} layers but the model has {num_layers}")
        if self.kv_heads != kv_heads:
            problems.append(f"it has {self.kv_heads} KV heads but the model has {kv_heads}")
        if self.head_dim != head_dim:
            problems.append(f"its head_dim is {self.head_dim} but the model's is {head_dim}")
        if problems:
            raise ValueError(f"DeltaKV compressor (trained for {trained_for or 'an unknown model'}) does not fit "
                             f"this model: {'; '.join(problems)}. Use a compressor trained for this model.")

    def serving_defaults(self) -> dict[str, Any]:
        """The serving knobs its training fixes (``{"num_sink_tokens": 16, "cluster_metric": "cosine", ...}``;
        only the knobs the training record holds) and, when calibrated, ``full_attn_layers`` (a tuple)."""
        out = {serving: self.training_knobs[name] for name, serving in TRAINING_TO_SERVING.items()
               if self.training_knobs.get(name) is not None}
        if self.filter_layers is not None:
            out["full_attn_layers"] = tuple(self.filter_layers)
        return out
