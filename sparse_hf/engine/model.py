"""A compact Llama / Qwen2 / Qwen3 decoder for the engine: packed tokens in, hidden states out.

Tokens of every sequence in a step are packed along one axis ``T`` (no padding). The attention layers know
nothing of scheduling: each calls ``backend.attend(layer_idx, q, k, v, scale)`` (see :mod:`.attention`), which
reads the per-step context (slot mapping, slot tables) set by the runner.

Differences from the transformers modules: q/k/v and gate/up are fused into one matmul each; Qwen2 has a qkv bias;
Qwen3 normalises q and k per head before RoPE. RoPE's ``inv_freq`` comes from transformers' own rotary module, so
every ``rope_scaling`` type that module supports without runtime updates works (``dynamic`` is refused).

Tensor parallelism (``tp``, see :mod:`.tp`): each rank builds its share of the heads and MLP columns; ``qkv_proj``
and ``gate_up_proj`` are then column-parallel, ``o_proj`` and ``down_proj`` row-parallel (:class:`RowParallelLinear`).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from sparse_hf.kernels import rms_norm, rope_qkv, silu_mul
from sparse_hf.kernels.skinny_gemm import skinny_linear

#: Backend of the fused layer ops (``"auto"``: Triton on CUDA, the torch references elsewhere). Tests set ``"triton"``
#: to run the kernels under the Triton interpreter on CPU.
OPS_BACKEND = "auto"
#: Decode-sized linears (at most 16 rows, fp16/bf16 on CUDA) through the weight-streaming Triton GEMM
#: (:func:`sparse_hf.kernels.skinny_gemm.skinny_linear`) instead of cuBLAS; off until measured faster on the GPU.
SKINNY_GEMM = False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the skinny Triton GEMM when :data:`SKINNY_GEMM` is on (it falls back by itself for prefill
    sizes and CPU tensors)."""
    if SKINNY_GEMM:
        return skinny_linear(x, weight, bias, backend=OPS_BACKEND)
    return F.linear(x, weight, bias)


#: True while a model whose every parameter is copied in next is built (:func:`skipping_init`).
_SKIP_INIT = contextvars.ContextVar("sparse_hf_engine_skip_init", default=False)


@contextlib.contextmanager
def skipping_init():
    """Build :class:`Linear` and :class:`Embedding` layers without their random init (their parameters hold
    whatever memory they got). Why: the engine copies every weight in right after (``load_weights`` raises unless
    each parameter is filled), and on the CPU the init of a 135M model cost ~0.6 s per engine, which the eval pays
    once per batch."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (random init skipped under :func:`skipping_init`)."""

    def reset_parameters(self) -> None:
        if not _SKIP_INIT.get():
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose random init is skipped under :func:`skipping_init`."""

    def reset_parameters(self) -> None:
        if not _SKIP_INIT.get():
            super().reset_parameters()

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "MistralForCausalLM": "llama"}


def model_family(hf_config) -> str:
    """``"llama"``, ``"qwen2"`` or ``"qwen3"`` from a transformers config; other models raise."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    by_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}
    if hf_config.model_type in by_type:
        return by_type[hf_config.model_type]
    raise NotImplementedError(f"the engine runs Llama, Qwen2 and Qwen3 models; got model_type="
                              f"{hf_config.model_type!r} (architectures {names}); use the HF path for this model")


def check_full_attention(hf_config, max_positions: int) -> None:
    """Refuse a config with sliding-window attention that a sequence of ``max_positions`` tokens would reach.

    The engine computes full attention in every layer. A sliding window of ``w`` tokens (transformers: a query
    sees the last ``w`` tokens, itself included) gives the same result only while every sequence has at most ``w``
    tokens, so a window at or above ``max_positions`` (``max_model_len``) is allowed, and any smaller one would give
    silently different tokens from the HF model. The window is read from ``layer_types`` where the config has them
    (Qwen2/Qwen3 with ``use_sliding_window=True``), else from ``sliding_window`` (Mistral: 4096 by default)."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    else:                                  # older configs: Qwen2's window only counts with use_sliding_window
        slides = window is not None and getattr(hf_config, "use_sliding_window", True)
        sliding = list(range(hf_config.num_hidden_layers)) if slides else []
    if not sliding:
        return
    if window is not None and window >= max_positions:
        return
    kinds = ", ".join(sorted({layer_types[i] for i in sliding}) if layer_types else ["sliding_attention"])
    fix = (f"pass max_model_len <= {window} if that is enough, else " if window is not None else "")
    raise NotImplementedError(
        f"this model has {kinds} layers {sliding} (sliding_window={window}); the engine computes full attention "
        f"in every layer, which gives other tokens once a sequence exceeds the window: {fix}use the HF model "
        "without the engine")


def head_dim_of(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32 (as transformers does). ``x``: ``[..., dim]``.

    ``forward(x, residual)`` first adds ``x`` into ``residual`` in place and normalises the sum (the pre-norm
    residual stream of a decoder layer). One fused kernel on CUDA, the torch reference elsewhere
    (:func:`sparse_hf.kernels.rms_norm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, residual, backend=OPS_BACKEND)


class Rotary(nn.Module):
    """RoPE from a precomputed ``[max_positions, head_dim]`` cos/sin table indexed by absolute position."""

    def __init__(self, hf_config, max_positions: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type == "dynamic":
            raise NotImplementedError("rope_type='dynamic' updates RoPE at run time; the engine does not support it")
        reference = LlamaRotaryEmbedding(config=hf_config)
        inv_freq = reference.inv_freq.float()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        scaling = float(reference.attention_scaling)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    # The rotation itself is :func:`sparse_hf.kernels.rope_qkv` (fused with the K/V store), fed from these tables.


class Attention(nn.Module):
    """Fused-QKV self-attention of one layer; the attention itself is the backend's."""

    def __init__(self, hf_config, family: str, layer_idx: int, rotary: Rotary, tp=None):
        super().__init__()
        tp_size = tp.size if tp is not None else 1
        self.layer_idx = layer_idx
        self.num_heads = hf_config.num_attention_heads // tp_size             # this rank's heads
        self.num_kv_heads = hf_config.num_key_value_heads // tp_size
        self.head_dim = head_dim_of(hf_config)
        self.scale = self.head_dim ** -0.5
        bias = family == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(hf_config.hidden_size, q_size + 2 * kv_size, bias=bias)
        self.o_proj = RowParallelLinear(q_size, hf_config.hidden_size, bool(getattr(hf_config, "attention_bias", False)),
                                        tp)
        self.qk_norm = family == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
        self.rotary = rotary
        self.backend = None                           # set by the runner (``EngineModel.set_backend``)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x``: ``[T, hidden]``, ``positions``: ``[T]`` -> ``[T, hidden]``.

        RoPE (after Qwen3's q/k norm) runs in one kernel that also stores K/V at the step's slots when the backend
        offers its pool (``kv_destination``); ``attend`` then skips its own store. Before that kernel a Qwen3 layer
        hands its pre-norm keys ``[T, Hkv, D]`` to a backend that keeps them (``store_pre_norm_keys``: DeltaKV's
        compressor reads keys before the norm)."""
        T = x.shape[0]
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 1e-6)
        destination = getattr(self.backend, "kv_destination", None)
        dest = destination(self.layer_idx) if destination is not None else None
        qkv = self.qkv_proj(x)
        if self.qk_norm:                 # a backend that compresses keys takes them before the norm (not invertible)
            keep_keys = getattr(self.backend, "store_pre_norm_keys", None)
            if keep_keys is not None:
                q_size, kv_size, _ = self.sizes
                keep_keys(self.layer_idx, qkv[:, q_size:q_size + kv_size].unflatten(-1, (self.num_kv_heads,
                                                                                            self.head_dim)))
        q, k, v = rope_qkv(qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads,
                           self.num_kv_heads, *norms, *(dest or (None, None, None)), backend=OPS_BACKEND)
        out = self.backend.attend(self.layer_idx, q, k, v, self.scale)          # [T, H, D]
        return self.o_proj(out.reshape(T, -1))


class RowParallelLinear(Linear):
    """A linear layer whose input features are split across tensor-parallel ranks: each rank multiplies its
    share, the partial outputs are summed by an all-reduce, then the (replicated) bias is added once.
    Without ``tp`` it is a plain ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp=None):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None or self.tp.size == 1:
            return super().forward(x)
        out = self.tp.all_reduce_sum(linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused."""

    def __init__(self, hf_config, tp=None):
        super().__init__()
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act={act!r}: the engine supports silu MLPs")
        self.inter = hf_config.intermediate_size // (tp.size if tp is not None else 1)    # this rank's columns
        self.gate_up_proj = Linear(hf_config.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = RowParallelLinear(self.inter, hf_config.hidden_size, False, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x), backend=OPS_BACKEND))


class DecoderLayer(nn.Module):
    def __init__(self, hf_config, family: str, layer_idx: int, rotary: Rotary, tp=None):
        super().__init__()
        self.self_attn = Attention(hf_config, family, layer_idx, rotary, tp)
        self.mlp = MLP(hf_config, tp)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor):
        """``x``: the previous layer's output ``[T, hidden]``; ``residual``: the residual stream before it (``None``
        at the first layer, where ``x`` is the embedding). Returns ``(mlp output, residual)``: the layer's result is
        their sum, which the next norm adds (fused add + RMSNorm, the residual updated in place)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, positions), residual)
        return self.mlp(h), residual


class EngineModel(nn.Module):
    """The decoder plus LM head. ``forward(input_ids [T], positions [T]) -> hidden [T, hidden]``;
    ``logits(hidden [n, hidden]) -> [n, vocab]`` float32.

    ``tp``: a :class:`~.tp.TPGroup` (or ``None``): this rank builds only its share of the heads and MLP columns
    (``num_heads``/``num_kv_heads`` are then the rank's); embeddings, norms and the LM head are replicated."""

    def __init__(self, hf_config, max_positions: int, tp=None):
        super().__init__()
        self.family = model_family(hf_config)
        check_full_attention(hf_config, max_positions)
        self.config = hf_config
        self.tp = tp
        tp_size = tp.size if tp is not None else 1
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads // tp_size
        self.num_kv_heads = hf_config.num_key_value_heads // tp_size
        self.head_dim = head_dim_of(hf_config)
        rotary = Rotary(hf_config, max_positions)
        self.embed_tokens = Embedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(hf_config, self.family, i, rotary, tp)
                                    for i in range(self.num_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        self.rotary = rotary

    def set_backend(self, backend) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions)
        return self.norm(x, residual)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, V]`` float32 logits; with ``out`` (``[n, V]`` float32) they are cast straight into it (one
        kernel less than a cast and a copy)."""
        weight = self.embed_tokens.weight if self.tied else self.lm_head.weight
        if out is not None:
            return out.copy_(linear(hidden, weight))
        return linear(hidden, weight).float()
