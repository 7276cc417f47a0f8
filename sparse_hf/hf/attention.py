"""The attention function registered with Transformers as ``"sparse_hf"``.

Hugging Face does not pass the cache to attention functions, so a forward pre-hook on every attention
module copies it into the keyword arguments under ``CACHE_KWARG``. When the cache is one of ours, the call
is handed to ``cache.attend``; otherwise the call goes to the implementation the model had before
``prepare_model`` (eager, with its attention weights, or SDPA), with that implementation's mask, so plain
calls on a prepared model behave exactly as before. Other implementations (flash attention, ...) fall back
to SDPA.
"""

from __future__ import annotations

import sys
import weakref

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

try:  # transformers >= 5.x
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover
    AttentionMaskInterface = None

from ..kernels.attention_lse import causal_attention_with_lse, efficient_attention_with_lse, sdpa_with_lse_cpu

ATTN_IMPLEMENTATION = "sparse_hf"
CACHE_KWARG = "sparse_hf_cache"


def attend_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF's 4D attention mask as bool, True = may attend (additive float masks: 0 = attend)."""
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0


def column_validity(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """``[B, L]`` bool: real (non-padding) columns, read from the last query row of the HF mask."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return attend_mask(attention_mask)[:, 0, -1, :length].expand(batch, length)


def query_validity(attention_mask: torch.Tensor | None, q_len: int, seen: int, batch: int, device) -> torch.Tensor:
    """``[B, q]`` bool: whether each query of this forward is a real token (padding queries see nothing of
    their own column)."""
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    m = attend_mask(attention_mask)
    rows = torch.arange(q_len, device=m.device)
    return m[:, 0, rows, seen - q_len + rows].expand(batch, q_len)


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """SDPA with a per-KV-head boolean mask.

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, n, D]``; mask: ``[B, Hkv, q, n]`` bool (True = attend).

    Returns:
        ``[B, q, H, D]`` (the layout HF attention functions return).
    """
    B, H, q, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    if q == 1:
        # One query token: fold the query heads of a KV group into the query axis; K/V are read once per group.
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(B, Hkv, G, D), key, value, attn_mask=mask, scale=scaling)
        out = out.reshape(B, H, 1, value.shape[-1])
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, G), repeat_kv(value, G), attn_mask=mask.repeat_interleave(G, dim=1), scale=scaling)
    return out.transpose(1, 2).contiguous()


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float):
    """What ``sdpa_attention_forward`` computes for a prompt over the whole (uncompacted) cache, plus each query's
    log-sum-exp, from one fused kernel that returns it; ``None`` where none does (the caller then runs SDPA).

    H2O's prompt mass (:func:`~sparse_hf.kernels.attention_mass.attention_mass`) reuses the log-sum-exp instead of
    recomputing ``q.k`` for it. CPU: torch's flash kernel, the one SDPA runs there (same output). CUDA: cuDNN's
    causal kernel for a prompt without padding or earlier chunks (HF passes no mask then), through
    :func:`sparse_hf.kernels.sdpa_split.sdpa_with_lse` (the engine's split route uses the same op); masked calls
    (padding, later chunks) and fp32 the memory-efficient kernel with HF's mask as a bias
    (:func:`~sparse_hf.kernels.attention_lse.efficient_attention_with_lse`).

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, n, D]``; attention_mask: HF's ``[B, 1, q, >= n]`` (bool or
            additive float) or ``None`` (causal for ``q > 1``).

    Returns:
        ``(out [B, q, H, D] as HF attention functions return it, lse [B, H, q] float32)`` or ``None``.
    """
    q_len, n = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1 and q_len != n:
        return None                                  # HF's truncated-keys corner case: leave it to SDPA
    causal = attention_mask is None and q_len > 1
    mask = attention_mask[:, :, :, :n] if attention_mask is not None else None
    fused = None
    if query.device.type == "cpu":
        fused = sdpa_with_lse_cpu(query, key, value, scaling, mask=mask, causal=causal)
    elif causal:                                     # cuDNN, else (fp32) the memory-efficient kernel
        fused = causal_attention_with_lse(query, key, value, scaling)
    elif mask is not None:
        fused = efficient_attention_with_lse(query, key, value, scaling, mask)
    if fused is None:
        return None
    out, lse = fused[:2]
    return out.transpose(1, 2).contiguous(), lse


# id(config) -> (weak reference to the config, the attention implementation it had before prepare_model)
_ORIGINAL_ATTN: dict[int, tuple[weakref.ref, str]] = {}


def remember_original_attention(config) -> None:
    """Record ``config``'s attention implementation before ``prepare_model`` replaces it with ours."""
    name = getattr(config, "_attn_implementation", None) or "sdpa"
    if name == ATTN_IMPLEMENTATION:
        return
    try:
        ref = weakref.ref(config, lambda _ref, key=id(config): _ORIGINAL_ATTN.pop(key, None))
    except TypeError:  # pragma: no cover - configs are plain objects
        return
    _ORIGINAL_ATTN[id(config)] = (ref, name)


def original_attention(config) -> str:
    """The implementation ``config`` had before ``prepare_model``: ``"eager"``, or ``"sdpa"`` for anything else."""
    entry = _ORIGINAL_ATTN.get(id(config)) if config is not None else None
    if entry is None or entry[0]() is not config:
        return "sdpa"
    return "eager" if entry[1] == "eager" else "sdpa"


def sparse_hf_mask(*args, config=None, **kwargs):
    """The mask for the ``sparse_hf`` implementation: eager's (additive float, always built) for models that were
    eager, else SDPA's. Sparse caches read either kind."""
    if original_attention(config) == "eager":
        return eager_mask(*args, config=config, **kwargs)
    return sdpa_mask(*args, config=config, **kwargs)


def _plain_attention(module):
    """The attention function for calls without a sparse cache: the model's own eager function when the model was
    eager (it returns the attention weights), else SDPA."""
    if original_attention(getattr(module, "config", None)) == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    return sdpa_attention_forward


def sparse_hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Dispatch to the sparse cache's ``attend``, or to the model's original implementation (see the module
    docstring)."""
    cache = kwargs.pop(CACHE_KWARG, None)
    if cache is None or not hasattr(cache, "attend"):
        return _plain_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register_attention() -> None:
    """Register the attention and mask functions under ``ATTN_IMPLEMENTATION`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_hf_attention)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparse_hf_mask)
