"""The attention function registered with Transformers as ``"sparse_hf"``.

Hugging Face does not pass the cache to attention functions, so a forward pre-hook on every attention
module copies it into the keyword arguments under ``CACHE_KWARG``. When the cache is one of ours, the call
is handed to ``cache.attend``; otherwise this is plain SDPA, so vanilla generation on the same model
is unchanged.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import AttentionInterface

try:  # transformers >= 5.x
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover
    AttentionMaskInterface = None

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


def sparse_hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Dispatch to the sparse cache's ``attend`` or fall back to SDPA."""
    cache = kwargs.pop(CACHE_KWARG, None)
    if cache is None or not hasattr(cache, "attend"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register_attention() -> None:
    """Register the attention and mask functions under ``ATTN_IMPLEMENTATION`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_hf_attention)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
