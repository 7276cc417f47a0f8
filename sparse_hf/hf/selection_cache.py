"""``SelectionCache``: the logical-masking family (OmniKV) on the HF path.

Every token stays in memory (one :class:`SlotLayer` per layer, never compacted). At each step the
observation layers select tokens, and the sparse layers after them attend only to those: at decode
through ``sparse_decode_attention`` (Triton on GPU, reading K/V in place), elsewhere by gathering.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from .attention import masked_attention
from .cache import SparseCache, query_validity

try:
    from sparse_hf.kernels import HAS_TRITON, decode_attention_with_scores, sparse_decode_attention
except ImportError:  # pragma: no cover - kernels are part of the package
    HAS_TRITON = False


def column_validity(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """``[B, L]`` bool: real (non-padding) columns, read from the last query row of the HF mask."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return m[:, 0, -1, :length].expand(batch, length)


def full_logits(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[B, H, q, L]`` fp32 scaled ``q.k`` for every query head (keys ``[B, Hkv, L, D]``)."""
    G = query.shape[1] // keys.shape[1]
    return torch.matmul(query.float(), repeat_kv(keys, G).float().transpose(-1, -2)) * scaling


class SelectionCache(SparseCache):
    """Keeps everything; ``self.selection`` is ``(idx, ok)`` ``[B, K]`` set by the latest observation layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selection = None

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        i = module.layer_idx
        if self.method.is_full(i):
            return self._attend_full(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if self.selection is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
            return out, None
        return self._attend_selected(self.layers[i], query, attention_mask, scaling), None

    # -- filter layers ---------------------------------------------------------------------------------------
    def _attend_full(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        i = module.layer_idx
        layer = self.layers[i]
        B, H, q_len, _ = query.shape
        observe = self.method.is_observer(i)
        valid = column_validity(attention_mask, B, layer.seen, query.device) if observe else None
        if observe and q_len == 1 and query.is_cuda and HAS_TRITON:
            out, logits = decode_attention_with_scores(query[:, :, 0], key, value, valid=valid, scale=scaling)
            self.selection = self.method.select_decode(logits, valid)
            return out.unsqueeze(1), None
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        if not observe:
            return out, None
        if q_len == 1:
            self.selection = self.method.select_decode(full_logits(query, key, scaling)[:, :, 0], valid)
        elif self.sparse_config.chunk_prefill_accel_omnikv and layer.seen > q_len:
            qv = query_validity(attention_mask, q_len, layer.seen, B, query.device)
            sel = self.method.select_prefill_chunk(full_logits(query, key, scaling), valid, qv)
            if sel is not None:   # the chunk itself is always visible (causally) to its own queries
                chunk = torch.arange(layer.seen - q_len, layer.seen, device=query.device).expand(B, q_len)
                sel = (torch.cat([sel[0], chunk], 1), torch.cat([sel[1], valid[:, -q_len:]], 1))
            self.selection = sel
        else:
            self.selection = None
        return out, None

    # -- sparse layers ----------------------------------------------------------------------------------------
    def _attend_selected(self, layer, query, attention_mask, scaling):
        idx, ok = self.selection                                               # [B, K]
        B, H, q_len, D = query.shape
        Hkv = layer.keys.shape[1]
        if q_len == 1 and query.is_cuda and HAS_TRITON:
            indices = torch.where(ok, idx, torch.full_like(idx, -1)).unsqueeze(1).expand(B, Hkv, idx.shape[1])
            out = sparse_decode_attention(query[:, :, 0], layer.keys, layer.values, indices, scale=scaling)
            return out.unsqueeze(1)
        K = idx.shape[1]
        gather = idx.view(B, 1, K, 1).expand(B, Hkv, K, D)
        keys = layer.keys.gather(2, gather)
        values = layer.values.gather(2, idx.view(B, 1, K, 1).expand(B, Hkv, K, layer.values.shape[-1]))
        if attention_mask is None:
            q_cols = torch.arange(layer.seen - q_len, layer.seen, device=idx.device).view(1, q_len, 1)
            allowed = idx.unsqueeze(1) <= q_cols
        else:
            m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            allowed = m[:, 0].expand(B, q_len, m.shape[-1]).gather(2, idx.unsqueeze(1).expand(B, q_len, K))
        allowed = (allowed & ok.unsqueeze(1)).unsqueeze(1).expand(B, Hkv, q_len, K)
        return masked_attention(query, keys, values, allowed, scaling)
