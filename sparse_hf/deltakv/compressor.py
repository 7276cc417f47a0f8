"""The DeltaKV compressor: one learned down/up projection pair per layer, as a Hugging Face model.

DeltaKV stores an old token as ``latent = down(x) - down(ref)`` and rebuilds it as ``up(latent) + ref``, where
``x = concat(K, V)`` over all KV heads **before RoPE** (Qwen3: also before ``k_norm``), so
``D = 2 * num_key_value_heads * head_dim``, and ``ref`` is the mean of the token's nearest cluster centers
(see :mod:`sparse_hf.deltakv.clustering`). The layout of ``x`` is ``[K head 0 .. K head n-1, V head 0 .. V head n-1]``,
each head ``head_dim`` wide: exactly ``torch.cat([k_proj(h), v_proj(h)], -1)``.

``DeltaKVCompressor`` is a ``PreTrainedModel``: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` work as
for any HF model, ``save_pretrained`` also writes a README.md model card, and ``from_pretrained`` additionally
reads checkpoints written by the reference trainer (see :mod:`sparse_hf.deltakv.reference_format`).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

try:  # transformers >= 5 spells it PreTrainedConfig; PretrainedConfig stays as an alias
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig

#: Projection types, and the aliases the reference accepts for them.
PROJECTION_TYPES = ("linear", "mlp_gelu", "mlp_swiglu")
_ALIASES = {"linear": "linear", "mlp": "mlp_gelu", "gelu": "mlp_gelu", "mlp_gelu": "mlp_gelu",
            "swiglu": "mlp_swiglu", "mlp_swiglu": "mlp_swiglu"}


def normalize_projection_type(kind: Any) -> str:
    """``'gelu'``/``'mlp'`` -> ``'mlp_gelu'``, ``'swiglu'`` -> ``'mlp_swiglu'``; anything unknown raises ValueError."""
    name = str(kind).strip().lower()
    if name not in _ALIASES:
        raise ValueError(f"unknown compressor projection type {kind!r}; expected one of {', '.join(PROJECTION_TYPES)}")
    return _ALIASES[name]


def model_kv_shape(model_config: Any) -> tuple[int, int, int]:
    """``(num_hidden_layers, num_key_value_heads, head_dim)`` of a decoder config (text config of multimodal ones)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(cfg.num_hidden_layers), int(kv_heads), int(head_dim)


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


@strict
class DeltaKVCompressorConfig(PreTrainedConfig):
    """Shape and provenance of a DeltaKV compressor.

    ``kv_dim = 2 * num_key_value_heads * head_dim`` is the input of ``down`` and the output of ``up``;
    ``kv_compressed_size`` is the latent width. The hidden size of an MLP projection is its directional size
    (``down_intermediate_size`` / ``up_intermediate_size``), else ``intermediate_size``, else ``(in + out) // 2``.
    ``compressed_layers=None`` means every layer. ``training`` (knobs such as cluster_ratio / neighbor_count),
    ``training_data`` and ``quality`` (measured numbers) only feed the model card.
    """

    model_type = "deltakv_compressor"

    num_hidden_layers: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    kv_compressed_size: int = 128
    down_type: str = "linear"
    up_type: str = "linear"
    intermediate_size: int | None = None
    down_intermediate_size: int | None = None
    up_intermediate_size: int | None = None
    bias: bool = True
    compressed_layers: list[int] | None = None
    base_model: str | None = None
    training_data: str | None = None
    training: dict | None = None
    quality: dict | None = None

    def __post_init__(self, **kwargs):
        self.down_type = normalize_projection_type(self.down_type)
        self.up_type = normalize_projection_type(self.up_type)
        for name in ("intermediate_size", "down_intermediate_size", "up_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:  # the reference writes -1 for "unset"
                setattr(self, name, None)
        if self.compressed_layers is not None:
            self.compressed_layers = sorted({int(i) for i in self.compressed_layers})
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.kv_compressed_size < 1:
            raise ValueError(f"kv_compressed_size={self.kv_compressed_size}: expected an int >= 1")
        bad = [i for i in (self.compressed_layers or []) if not 0 <= i < max(self.num_hidden_layers, 1)]
        if bad and self.num_hidden_layers:
            raise ValueError(f"compressed_layers {bad} out of range for {self.num_hidden_layers} layers")

    @property
    def kv_dim(self) -> int:
        """D = 2 * num_key_value_heads * head_dim: the width of concat(K, V)."""
        return 2 * self.num_key_value_heads * self.head_dim

    @property
    def layer_indices(self) -> list[int]:
        """The compressed layers (all layers when ``compressed_layers`` is None)."""
        return list(range(self.num_hidden_layers)) if self.compressed_layers is None else list(self.compressed_layers)

    def hidden_size_for(self, direction: str) -> int:
        """Hidden width of the ``'down'`` or ``'up'`` MLP (unused by linear projections)."""
        own = self.down_intermediate_size if direction == "down" else self.up_intermediate_size
        return own or self.intermediate_size or (self.kv_dim + self.kv_compressed_size) // 2


class LayerCompressor(nn.Module):
    """The ``down`` [..., D] -> [..., latent] and ``up`` [..., latent] -> [..., D] pair of one layer."""

    def __init__(self, config: DeltaKVCompressorConfig):
        super().__init__()
        d, latent = config.kv_dim, config.kv_compressed_size
        self.down = build_projection(config.down_type, d, latent, config.hidden_size_for("down"), config.bias)
        self.up = build_projection(config.up_type, latent, d, config.hidden_size_for("up"), config.bias)


class DeltaKVCompressor(PreTrainedModel):
    """Per-layer DeltaKV projections; ``layers[str(i)]`` holds layer ``i``'s :class:`LayerCompressor`.

    Inputs are cast to the compressor's dtype, and outputs stay in it: callers cast back to their KV dtype.
    """

    config_class = DeltaKVCompressorConfig
    base_model_prefix = "deltakv_compressor"
    main_input_name = "x"
    _no_split_modules = ["LayerCompressor"]

    def __init__(self, config: DeltaKVCompressorConfig):
        super().__init__(config)
        if min(config.num_hidden_layers, config.num_key_value_heads, config.head_dim) < 1:
            raise ValueError("DeltaKVCompressorConfig needs num_hidden_layers, num_key_value_heads and head_dim >= 1; "
                             "build one with DeltaKVCompressor.for_model(model.config, ...)")
        self.layers = nn.ModuleDict({str(i): LayerCompressor(config) for i in config.layer_indices})
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Linear layers get PyTorch's default scale, U(±1/sqrt(fan_in)), and zero bias."""
        if isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)

    # -- the math ---------------------------------------------------------------------------------------------
    def _layer(self, layer_idx: int) -> LayerCompressor:
        key = str(int(layer_idx))
        if key not in self.layers:
            raise ValueError(f"layer {layer_idx} has no compressor; compressed layers: {self.config.layer_indices}")
        return self.layers[key]

    def _cast(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if x.shape[-1] != width:
            raise ValueError(f"{what} must have last dim {width}, got shape {tuple(x.shape)}")
        return x.to(self.dtype)

    def down(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """Project concat(K, V) [..., D] to the latent space [..., kv_compressed_size]."""
        return self._layer(layer_idx).down(self._cast(x, self.config.kv_dim, "down's input concat(K, V)"))

    def up(self, layer_idx: int, z: torch.Tensor) -> torch.Tensor:
        """Project a latent [..., kv_compressed_size] back to concat(K, V) space [..., D]."""
        return self._layer(layer_idx).up(self._cast(z, self.config.kv_compressed_size, "up's input latent"))

    def forward(self, x: torch.Tensor, layer_idx: int = 0) -> torch.Tensor:
        """Plain autoencoding ``up(down(x))`` of one layer, [..., D] -> [..., D] (no reference subtracted)."""
        return self.up(layer_idx, self.down(layer_idx, x))

    # -- construction -------------------------------------------------------------------------------------------
    def check_compatible(self, model_config: Any) -> None:
        """Raise ValueError when this compressor was not made for a model with ``model_config``'s KV shape."""
        layers, kv_heads, head_dim = model_kv_shape(model_config)
        c = self.config
        problems = []
        if c.num_hidden_layers != layers:
            problems.append(f"it has {c.num_hidden_layers} layers but the model has {layers}")
        if c.num_key_value_heads != kv_heads:
            problems.append(f"it has {c.num_key_value_heads} KV heads but the model has {kv_heads}")
        if c.head_dim != head_dim:
            problems.append(f"its head_dim is {c.head_dim} but the model's is {head_dim}")
        if problems:
            raise ValueError(f"DeltaKV compressor (trained for {c.base_model or 'an unknown model'}) does not fit "
                             f"this model: {'; '.join(problems)}. Use a compressor trained for this model.")

    @classmethod
    def for_model(cls, model_config: Any, kv_compressed_size: int = 128, down_type: str = "linear",
                  up_type: str = "linear", intermediate_size: int | None = None,
                  down_intermediate_size: int | None = None, up_intermediate_size: int | None = None,
                  bias: bool = True, compressed_layers: list[int] | None = None,
                  base_model: str | None = None) -> "DeltaKVCompressor":
        """A freshly initialized compressor shaped for the model described by ``model_config``."""
        layers, kv_heads, head_dim = model_kv_shape(model_config)
        config = DeltaKVCompressorConfig(
            num_hidden_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim,
            kv_compressed_size=kv_compressed_size, down_type=down_type, up_type=up_type,
            intermediate_size=intermediate_size, down_intermediate_size=down_intermediate_size,
            up_intermediate_size=up_intermediate_size, bias=bias, compressed_layers=compressed_layers,
            base_model=base_model or getattr(model_config, "_name_or_path", None) or None)
        return cls(config)

    @classmethod
    def identity_for(cls, model_config: Any) -> "DeltaKVCompressor":
        """An exactly invertible compressor: linear, latent = D, identity weights, no bias (for tests)."""
        _, kv_heads, head_dim = model_kv_shape(model_config)
        compressor = cls.for_model(model_config, kv_compressed_size=2 * kv_heads * head_dim, bias=False)
        with torch.no_grad():
            for layer in compressor.layers.values():
                layer.down.weight.copy_(torch.eye(layer.down.weight.shape[0]))
                layer.up.weight.copy_(torch.eye(layer.up.weight.shape[0]))
        return compressor

    # -- Hub conventions ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> "DeltaKVCompressor":
        """Load a compressor from a local directory or a Hub id.

        Reads this project's format (config.json with ``model_type: deltakv_compressor``) and the reference
        trainer's format (a base-model config.json plus ``model.layers.{i}.self_attn.compress_*`` tensors).
        """
        from sparse_hf.deltakv import reference_format as ref

        local = ref.resolve_checkpoint_dir(pretrained_model_name_or_path, kwargs)
        if ref.is_native_checkpoint(local):
            return super().from_pretrained(local, *args, **kwargs)
        return ref.load_reference_checkpoint(cls, local, dtype=kwargs.get("dtype"))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, quality: dict | None = None,
                        training_data: str | None = None, training: dict | None = None, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained`` plus a README.md model card.

        ``quality`` (measured numbers, e.g. ``{"perplexity (DeltaKV)": 7.9}``), ``training_data`` and ``training``
        (knobs) are stored in the config and rendered in the card; missing quality fields read "not measured".
        """
        from sparse_hf.deltakv.model_card import render_model_card

        if quality is not None:
            self.config.quality = dict(quality)
        if training_data is not None:
            self.config.training_data = str(training_data)
        if training is not None:
            self.config.training = dict(training)
        push = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            card = render_model_card(self.config, num_parameters=self.num_parameters())
            with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
        if push:
            self.push_to_hub(repo_id, token=kwargs.get("token"))

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload DeltaKV compressor",
                    private: bool | None = None, token: str | None = None, revision: str | None = None,
                    create_pr: bool = False, quality: dict | None = None, training_data: str | None = None,
                    **kwargs) -> Any:
        """Upload config.json, model.safetensors and our README.md model card (HF's generic card would replace it)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, quality=quality, training_data=training_data)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel.from_pretrained`` open native compressor directories too."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(DeltaKVCompressorConfig.model_type, DeltaKVCompressorConfig, exist_ok=True)
    AutoModel.register(DeltaKVCompressorConfig, DeltaKVCompressor, exist_ok=True)


_register_auto_classes()
