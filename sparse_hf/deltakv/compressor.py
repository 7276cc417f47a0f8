"""The Hub-facing DeltaKV compressor: :class:`DeltaKVCompressor`, a ``PreTrainedModel`` around the core
:class:`~sparse_hf.deltakv.projections.DeltaKVProjections` (the plain ``nn.Module`` with the math).

``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` work as for any HF model, ``save_pretrained`` also
writes a README.md model card, and ``from_pretrained`` additionally reads checkpoints written by the reference
trainer (see :mod:`sparse_hf.deltakv.reference_format`). The core never imports this module.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from sparse_hf.deltakv.projections import PROJECTION_TYPES  # noqa: F401  (re-exported: the trainer CLI checks it)
from sparse_hf.deltakv.projections import DeltaKVProjections, normalize_projection_type

try:  # transformers >= 5 spells it PreTrainedConfig; PretrainedConfig stays as an alias
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig


def model_kv_shape(model_config: Any) -> tuple[int, int, int]:
    """``(num_hidden_layers, num_key_value_heads, head_dim)`` of a decoder config (text config of multimodal ones)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(cfg.num_hidden_layers), int(kv_heads), int(head_dim)


def _layer_set(layers) -> list[int] | None:
    """A layer list as the config stores it: sorted, without repeats (``None`` stays ``None``)."""
    return None if layers is None else sorted({int(i) for i in layers})


@strict
class DeltaKVCompressorConfig(PreTrainedConfig):
    """Shape and provenance of a DeltaKV compressor.

    ``kv_dim = 2 * num_key_value_heads * head_dim`` is the input of ``down`` and the output of ``up``;
    ``kv_compressed_size`` is the latent width. The hidden size of an MLP projection is its directional size
    (``down_intermediate_size`` / ``up_intermediate_size``), else ``intermediate_size``, else ``(in + out) // 2``.
    ``compressed_layers=None`` means every layer. ``training`` (knobs such as cluster_ratio / neighbor_count) sets
    serving's clustering defaults and, with ``training_data`` and ``quality`` (measured numbers), feeds the model
    card. ``full_attn_layers`` (``None``: not calibrated) are the filter layers chosen for this compressor
    (``sparse-hf calibrate --deltakv-path ... --save-compressor DIR``): serving uses them unless the caller sets
    ``full_attn_layers``, because which layers a compressor may compress depends on how well it rebuilds each one
    (on Qwen2.5-Coder-0.5B at a 0.25 budget: 0.78 of the full cache's score with OmniKV's calibrated layers, which
    compress layer 16, and 0.99 with the set calibrated for DeltaKV, which keeps it raw).
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
    full_attn_layers: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.down_type = normalize_projection_type(self.down_type)
        self.up_type = normalize_projection_type(self.up_type)
        for name in ("intermediate_size", "down_intermediate_size", "up_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:  # the reference writes -1 for "unset"
                setattr(self, name, None)
        self.compressed_layers = _layer_set(self.compressed_layers)
        self.full_attn_layers = _layer_set(self.full_attn_layers)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.kv_compressed_size < 1:
            raise ValueError(f"kv_compressed_size={self.kv_compressed_size}: expected an int >= 1")
        bad = [i for i in (self.compressed_layers or []) if not 0 <= i < max(self.num_hidden_layers, 1)]
        if bad and self.num_hidden_layers:
            raise ValueError(f"compressed_layers {bad} out of range for {self.num_hidden_layers} layers")
        if self.full_attn_layers is not None:
            bad = [i for i in self.full_attn_layers if not 0 <= i < max(self.num_hidden_layers, 1)]
            if bad and self.num_hidden_layers:
                raise ValueError(f"full_attn_layers {bad} out of range for {self.num_hidden_layers} layers")
            if 0 not in self.full_attn_layers:
                raise ValueError(f"full_attn_layers={self.full_attn_layers} must include layer 0 (DeltaKV's first "
                                 "filter layer)")

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


class DeltaKVCompressor(PreTrainedModel):
    """Per-layer DeltaKV projections as a Hugging Face model; ``layers[str(i)]`` holds layer ``i``'s
    :class:`LayerCompressor`, shared with :attr:`projections` (the core module that does the math).

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
        core = DeltaKVProjections(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                  config.kv_compressed_size, config.layer_indices, config.down_type, config.up_type,
                                  config.hidden_size_for("down"), config.hidden_size_for("up"), config.bias)
        self.layers = core.layers                  # registered here: the state-dict keys stay ``layers.{i}...``
        self.__dict__["_core"] = core              # not a submodule (its parameters are ours already)
        self.post_init()

    @property
    def projections(self) -> DeltaKVProjections:
        """The core module (same parameters), with the training record of :attr:`config` as its training knobs."""
        core = self.__dict__["_core"]
        core.layers = self.layers                  # follows a replaced ModuleDict (e.g. after loading)
        core.training_knobs = dict(self.config.training or {})
        core.filter_layers = self.config.full_attn_layers
        return core

    def _init_weights(self, module: nn.Module) -> None:
        """Linear layers get PyTorch's default scale, U(±1/sqrt(fan_in)), and zero bias."""
        if isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)

    # -- the math (the core module's) ----------------------------------------------------------------------------
    def down(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """Project concat(K, V) [..., D] to the latent space [..., kv_compressed_size]."""
        return self.projections.down(layer_idx, x)

    def up(self, layer_idx: int, z: torch.Tensor) -> torch.Tensor:
        """Project a latent [..., kv_compressed_size] back to concat(K, V) space [..., D]."""
        return self.projections.up(layer_idx, z)

    def forward(self, x: torch.Tensor, layer_idx: int = 0) -> torch.Tensor:
        """Plain autoencoding ``up(down(x))`` of one layer, [..., D] -> [..., D] (no reference subtracted)."""
        return self.projections(x, layer_idx)

    # -- construction -------------------------------------------------------------------------------------------
    def check_compatible(self, model_config: Any) -> None:
        """Raise ValueError when this compressor was not made for a model with ``model_config``'s KV shape."""
        self.projections.check_shape(*model_kv_shape(model_config), trained_for=self.config.base_model)

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
        """Load a compressor from a local directory, a Hub id, or the name of a shipped one (``"demo"``,
        ``"qwen-coder"``: see :data:`sparse_hf.deltakv.demo.SHIPPED_COMPRESSORS`).

        Reads this project's format (config.json with ``model_type: deltakv_compressor``) and the reference
        trainer's format (a base-model config.json plus ``model.layers.{i}.self_attn.compress_*`` tensors).
        """
        from sparse_hf.deltakv import reference_format as ref
        from sparse_hf.deltakv.demo import resolve_compressor_path

        local = ref.resolve_checkpoint_dir(resolve_compressor_path(pretrained_model_name_or_path), kwargs)
        if ref.is_native_checkpoint(local):
            return super().from_pretrained(local, *args, **kwargs)
        return ref.load_reference_checkpoint(cls, local, dtype=kwargs.get("dtype"))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, quality: dict | None = None,
                        training_data: str | None = None, training: dict | None = None,
                        full_attn_layers: list[int] | None = None, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained`` plus a README.md model card.

        ``quality`` (measured numbers, e.g. ``{"perplexity (DeltaKV)": 7.9}``), ``training_data``, ``training``
        (knobs) and ``full_attn_layers`` (the filter layers calibrated for it, serving's default) are stored in the
        config and rendered in the card; missing quality fields read "not measured".
        """
        from sparse_hf.deltakv.model_card import render_model_card

        if quality is not None:
            self.config.quality = dict(quality)
        if training_data is not None:
            self.config.training_data = str(training_data)
        if training is not None:
            self.config.training = dict(training)
        if full_attn_layers is not None:
            self.config.full_attn_layers = _layer_set(full_attn_layers)
            self.config.validate_architecture()
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


def resolve_compressor(compressor, deltakv_path, model_config) -> tuple[nn.Module, DeltaKVProjections]:
    """``(compressor, projections)`` for serving: ``compressor`` (a :class:`DeltaKVCompressor` or its core
    :class:`DeltaKVProjections`) or, when ``None``, the one :meth:`DeltaKVCompressor.from_pretrained` loads from
    ``deltakv_path``; checked against ``model_config``'s KV shape and set to eval mode. The HF cache and the
    engine both call this (raises ``ValueError`` for any other object)."""
    comp = compressor if compressor is not None else DeltaKVCompressor.from_pretrained(deltakv_path)
    if isinstance(comp, DeltaKVCompressor):
        comp.check_compatible(model_config)
        return comp.eval(), comp.projections
    if isinstance(comp, DeltaKVProjections):
        comp.check_shape(*model_kv_shape(model_config))
        return comp.eval(), comp
    raise ValueError(f"compressor must be a DeltaKVCompressor (or its core DeltaKVProjections), got "
                     f"{type(comp).__name__}")


def serving_method(method, projections: DeltaKVProjections, explicit_knobs):
    """``method`` rebuilt for serving with ``projections``: the compressor's training knobs and calibrated filter
    layers become the defaults (``explicit_knobs``, the names the caller set, win; a new config, the caller's is never
    changed), every layer the rebuilt method compresses must have weights, and the latent bits must suit the latent
    width (``ValueError``)."""
    from .quant import check_bits

    config = method.with_compressor_defaults(method.config, projections.serving_defaults(), explicit_knobs)
    served = type(method)(config, method.num_layers)
    missing = [i for i in served.sparse_layers() if str(i) not in projections.layers]
    if missing:
        raise ValueError(f"the compressor has no weights for layers {missing}, which deltakv compresses "
                         f"(every layer not in full_attn_layers={list(served.full_layers)})")
    check_bits(config.kv_quant_bits, projections.latent_size)
    return served


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel.from_pretrained`` open native compressor directories too."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(DeltaKVCompressorConfig.model_type, DeltaKVCompressorConfig, exist_ok=True)
    AutoModel.register(DeltaKVCompressorConfig, DeltaKVCompressor, exist_ok=True)


_register_auto_classes()
