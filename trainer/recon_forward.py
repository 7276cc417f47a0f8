"""Run a Llama / Qwen2 / Qwen3 causal LM with every compressed layer's K and V replaced by DeltaKV reconstructions.

``ReconstructedKV(model, compressor)`` is a context manager that swaps each attention module's ``forward`` for
:func:`attention_forward`, a mirror of the HF modeling code (projections, Qwen3 ``q_norm``/``k_norm``, RoPE from the
model's ``position_embeddings``, ``cache.update``, then the ``ALL_ATTENTION_FUNCTIONS`` interface) with one step
added right after the K/V projections::

    x     = concat(k_proj(h), v_proj(h))                        [B, N, D]   pre-RoPE, pre-k_norm
    recon = cluster_reconstruct(x, compressor, layer, ...)      [B, N, D]   sinks raw, the rest up(down(x)-down(ref))+ref

and the per-layer reconstruction MSE (recon vs the raw x, or vs targets recorded by a ``mode="record"`` pass) is
kept in ``layer_mse`` for the training loss. Works with transformers 5.17 (``past_key_values=``) and 5.24
(``cache=``). Batches must be unpadded packed blocks: token ``i`` of every row is at position ``i``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sparse_hf.deltakv.clustering import METRICS, cluster_reconstruct
from sparse_hf.deltakv.rope import rotate

MODES = ("reconstruct", "record", "off")


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention with GQA, used when the model's modeling module has no eager function."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every module with ``q_proj/k_proj/v_proj/o_proj``, ``head_dim`` and ``layer_idx``, in layer order."""
    found = [m for m in model.modules()
             if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx"))]
    if not found:
        raise ValueError(f"{type(model).__name__} has no Llama/Qwen2/Qwen3-style attention modules "
                         "(q_proj, k_proj, v_proj, o_proj, head_dim, layer_idx)")
    return sorted(found, key=lambda m: m.layer_idx)


class ReconstructedKV:
    """Context manager: inside it, ``model(...)`` attends to DeltaKV-reconstructed K/V.

    Args:
        model: a ``*ForCausalLM`` (or its base model) of the Llama / Qwen2 / Qwen3 family.
        compressor: a :class:`~sparse_hf.deltakv.DeltaKVCompressor` shaped for ``model`` (checked).
        num_sink: leading tokens kept raw; they are also centers (16 in reference training).
        cluster_ratio: one center every ``int(1 / cluster_ratio)`` tokens after the sinks.
        neighbor_count: fathers per token; the reference is their mean.
        metric: ``"l2"``, ``"dot"`` or ``"cosine"``.
        mode: ``"reconstruct"`` (default), ``"record"`` (plain attention; store each layer's raw x, detached, as
            the MSE target of the next reconstruct pass) or ``"off"`` (plain attention).

    Attributes:
        layer_mse: ``{layer: scalar}`` MSE of the last reconstruct pass, float32, with grad.
        targets: ``{layer: [B, N, D]}`` raw x recorded by the last record pass.
    """

    def __init__(self, model: nn.Module, compressor: Any, *, num_sink: int = 16, cluster_ratio: float = 0.1,
                 neighbor_count: int = 4, metric: str = "l2", mode: str = "reconstruct"):
        if metric not in METRICS:
            raise ValueError(f"unknown cluster metric {metric!r}; expected one of {', '.join(METRICS)}")
        if neighbor_count < 1 or num_sink < 0 or not 0.0 < cluster_ratio <= 1.0:
            raise ValueError(f"need neighbor_count >= 1, num_sink >= 0 and 0 < cluster_ratio <= 1; got "
                             f"{neighbor_count}, {num_sink}, {cluster_ratio}")
        compressor.check_compatible(model.config)
        self.model, self.compressor = model, compressor
        self.num_sink, self.cluster_ratio, self.neighbor_count, self.metric = num_sink, cluster_ratio, neighbor_count, metric
        self.mode = mode
        self.layer_mse: dict[int, torch.Tensor] = {}
        self.targets: dict[int, torch.Tensor] = {}
        self._modules = find_attention_modules(model)
        self._layers = set(compressor.config.layer_indices)
        self._depth = 0

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode={value!r}: expected one of {', '.join(MODES)}")
        self._mode = value

    def total_mse(self) -> torch.Tensor:
        """Sum over layers of the last reconstruct pass's MSE (a float32 scalar; 0 when none)."""
        if not self.layer_mse:
            return torch.zeros((), device=self.compressor.device)
        return torch.stack(list(self.layer_mse.values())).sum()

    def install(self) -> "ReconstructedKV":
        """Swap in the reconstructing attention forward (nestable; undone by a matching :meth:`remove`)."""
        if self._depth == 0:
            self._saved = {id(m): m.__dict__.get("forward") for m in self._modules}
            for module in self._modules:
                module.forward = types.MethodType(_make_forward(self), module)
        self._depth += 1
        return self

    def remove(self) -> None:
        """Undo one :meth:`install`; the last one puts back whatever instance forward was there before."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            for module in self._modules:  # e.g. accelerate hooks install an instance forward
                saved = self._saved.get(id(module))
                if saved is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = saved

    def __enter__(self) -> "ReconstructedKV":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- called from inside each attention forward ----------------------------------------------------------------
    def process(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> the K/V the layer attends to (raw, or reconstructed), recording MSE / targets."""
        if self._mode == "off" or layer not in self._layers:
            return x
        if self._mode == "record":
            self.targets[layer] = x.detach()
            return x
        recon = cluster_reconstruct(x, self.compressor, layer, num_sink=self.num_sink, cluster_ratio=self.cluster_ratio,
                                    k=self.neighbor_count, metric=self.metric)
        target = self.targets.get(layer)
        if target is None or target.shape != x.shape:
            target = x
        self.layer_mse[layer] = F.mse_loss(recon.float(), target.detach().float())
        return recon.to(x.dtype)


def _make_forward(state: ReconstructedKV):
    def forward(module, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        return attention_forward(module, state, hidden_states, position_embeddings, attention_mask, **kwargs)

    return forward


def attention_forward(module: nn.Module, state: ReconstructedKV, hidden_states: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HF ``*Attention.forward`` with K/V passed through ``state.process`` before k_norm and RoPE.

    hidden_states: ``[B, N, hidden]``; returns ``(o_proj(attn) [B, N, hidden], attention weights or None)``.
    """
    new_style = "cache" in kwargs  # 5.24 passes cache=, 5.17 past_key_values=
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)

    key_flat, value_flat = module.k_proj(hidden_states), module.v_proj(hidden_states)
    x = state.process(module.layer_idx, torch.cat([key_flat, value_flat], dim=-1))
    key_flat, value_flat = x.split([key_flat.shape[-1], value_flat.shape[-1]], dim=-1)

    query = module.q_proj(hidden_states).view(hidden_shape)
    key = key_flat.reshape(hidden_shape)
    if hasattr(module, "q_norm"):
        query = module.q_norm(query)
    if hasattr(module, "k_norm"):
        key = module.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = value_flat.reshape(hidden_shape).transpose(1, 2)

    modeling = sys.modules.get(type(module).__module__)
    cos, sin = position_embeddings
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is not None:
        query, key = rope(query, key, cos, sin)
    else:
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)

    if cache is not None:
        if new_style:
            key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
        else:
            key, value = cache.update(key, value, module.layer_idx)

    eager = getattr(modeling, "eager_attention_forward", None) or _eager_attention
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
    if hasattr(module, "sliding_window"):
        kwargs["sliding_window"] = module.sliding_window
    out, weights = attention(module, query, key, value, attention_mask,
                             dropout=0.0 if not module.training else module.attention_dropout,
                             scaling=module.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return module.o_proj(out), weights
