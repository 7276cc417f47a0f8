"""``SelectionCache``: the logical-masking family (OmniKV) on the HF path.

Every token stays in memory (one :class:`SlotLayer` per layer, never compacted). At each step the
observation layers select tokens, and the sparse layers after them attend only to those: at decode
through ``sparse_decode_attention`` (Triton on GPU, reading K/V in place), elsewhere by gathering.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from .attention import attend_mask, column_validity, masked_attention, query_validity
from .cache import SparseCache, dense_gpu_decode

from sparse_hf.kernels import decode_attention_with_scores, sparse_decode_attention
from sparse_hf.kernels.dispatch import kernels_run_fused


def full_logits(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[B, H, q, L]`` fp32 scaled ``q.k`` for every query head (keys ``[B, Hkv, L, D]``)."""
    G = query.shape[1] // keys.shape[1]
    return torch.matmul(query.float(), repeat_kv(keys, G).float().transpose(-1, -2)) * scaling


class SelectionCache(SparseCache):
    """Keeps everything; ``self.selection`` is ``(idx, ok)`` ``[B, K]`` set by the latest observation layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selection = None
        self.selection_masks = None               # [B, q, L] per-query selection of a multi-token decode step
        self._indices = self._indices_of = None   # the selection as a [B, 1, K] index list (GPU decode)

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        i = module.layer_idx
        layer = self.layers[i]
        if self.in_prefill(layer, query.shape[2]):
            out = self._attend_prefill(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
            if self.prompt_complete(layer):
                layer.drop_padding(attention_mask)
                layer.freeze()
            return out, None
        if query.shape[2] > 1:
            return self._decode_many(module, layer, query, key, value, attention_mask, scaling, **kwargs), None
        if self.method.is_full(i):
            return self._decode_full(module, layer, query, key, value, attention_mask, scaling, **kwargs), None
        if self.selection is None:
            return self._decode_all(module, layer, query, key, value, attention_mask, scaling, **kwargs), None
        return self._decode_selected(layer, query, attention_mask, scaling), None

    # -- decode -------------------------------------------------------------------------------------------------
    def _decode_all(self, module, layer, query, key, value, attention_mask, scaling, **kwargs):
        out = dense_gpu_decode(layer, query, scaling)
        if out is not None:
            return out
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]

    def _decode_full(self, module, layer, query, key, value, attention_mask, scaling, **kwargs):
        i = module.layer_idx
        if not self.method.is_observer(i):
            return self._decode_all(module, layer, query, key, value, attention_mask, scaling, **kwargs)
        if layer.frozen and kernels_run_fused(query):
            valid = layer.full_valid()                                         # [B, capacity]
            out, logits = decode_attention_with_scores(query[:, :, 0], *layer.buffers[:2], valid=valid,
                                                       scale=scaling)
            out = out.unsqueeze(1)
        else:
            valid = layer.positions[:, 0] >= 0 if layer.frozen else column_validity(
                attention_mask, query.shape[0], layer.seen, query.device)
            out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]
            logits = full_logits(query, key, scaling)[:, :, 0]
        self.observe(logits, valid, layer.seen)
        return out

    def observe(self, logits: torch.Tensor, valid: torch.Tensor, length: int) -> None:
        """An observation layer's decode scores (``logits`` ``[B, H, L]``) become the sparse layers' selection."""
        self.selection = self.method.select_decode(logits, valid, valid.sum(-1))   # per-row lengths, on device

    def _decode_selected(self, layer, query, attention_mask, scaling):
        idx, ok = self.selection                                               # [B, K]
        B, H, _, D = query.shape
        Hkv = layer.keys.shape[1]
        if kernels_run_fused(query):
            if self._indices_of is not self.selection:   # once per selection, not once per sparse layer
                self._indices, self._indices_of = torch.where(ok, idx, -1).unsqueeze(1), self.selection
            indices = self._indices.expand(B, Hkv, idx.shape[1])
            return sparse_decode_attention(query[:, :, 0], *layer.buffers[:2], indices, scale=scaling).unsqueeze(1)
        return self._gather_attention(layer, query, idx, ok, attention_mask, scaling)

    def _decode_many(self, module, layer, query, key, value, attention_mask, scaling, **kwargs):
        """Several new tokens after the prompt (assisted generation's draft verification, ``query [B, H, q, D]``):
        each query attends as its own one-token decode step would, so verifying drafts gives what decoding them
        one at a time gives. Per query, the observation layer selects over the columns up to that query."""
        i = module.layer_idx
        if self.method.is_full(i) or self.selection_masks is None:
            if self.method.is_observer(i):
                self.selection_masks = self._select_per_query(layer, query, key, scaling)
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]
        B, Hkv, q_len = query.shape[0], key.shape[1], query.shape[2]
        allowed = self.selection_masks                                             # [B, q, L]
        if attention_mask is not None:
            allowed = allowed & attend_mask(attention_mask)[:, 0, :, :allowed.shape[-1]]
        return masked_attention(query, key, value, allowed.unsqueeze(1).expand(B, Hkv, q_len, -1), scaling)

    def _select_per_query(self, layer, query, key, scaling):
        """``[B, q, L]`` bool: the columns each of the ``q`` new queries may read in the sparse layers (all of its
        columns where the budget covers them)."""
        B, _, q_len, _ = query.shape
        L = key.shape[2]
        logits = full_logits(query, key, scaling)                                  # [B, H, q, L]
        valid = layer.positions[:, 0, :L] >= 0
        cols = torch.arange(L, device=key.device)
        masks = []
        for j in range(q_len):
            length = layer.seen - q_len + j + 1
            own = valid & (cols < length)
            # As if decoded alone: the selection sees only the columns this query has (size fixed by ``length``).
            sel = self.method.select_decode(logits[:, :, j, :length], own[:, :length], own.sum(-1))
            if sel is not None:
                own = torch.zeros_like(own).scatter_(1, sel[0], sel[1])
            masks.append(own)
        return torch.stack(masks, 1)

    # -- prefill ------------------------------------------------------------------------------------------------
    def _attend_prefill(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        i = module.layer_idx
        layer = self.layers[i]
        B, H, q_len, _ = query.shape
        accel = self.sparse_config.chunk_prefill_accel_omnikv
        if not self.method.is_full(i):
            if accel and self.selection is not None:
                idx, ok = self.selection
                return self._gather_attention(layer, query, idx, ok, attention_mask, scaling)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)[0]
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)[0]
        if self.method.is_observer(i):
            self.selection = None
            if accel and layer.seen > q_len:
                valid = column_validity(attention_mask, B, layer.seen, query.device)
                qv = query_validity(attention_mask, q_len, layer.seen, B, query.device)
                sel = self.method.select_prefill_chunk(full_logits(query, key, scaling), valid, qv)
                if sel is not None:   # the chunk itself is always visible (causally) to its own queries
                    chunk = torch.arange(layer.seen - q_len, layer.seen, device=query.device).expand(B, q_len)
                    self.selection = (torch.cat([sel[0], chunk], 1), torch.cat([sel[1], valid[:, -q_len:]], 1))
        return out

    def _gather_attention(self, layer, query, idx, ok, attention_mask, scaling):
        """Attention over slots ``idx`` (``[B, K]``, entries with ``ok == False`` ignored), by gathering them."""
        B, H, q_len, D = query.shape
        Hkv, K = layer.keys.shape[1], idx.shape[1]
        keys = layer.keys.gather(2, idx.view(B, 1, K, 1).expand(B, Hkv, K, D))
        values = layer.values.gather(2, idx.view(B, 1, K, 1).expand(B, Hkv, K, layer.values.shape[-1]))
        if attention_mask is None:
            q_cols = torch.arange(layer.seen - q_len, layer.seen, device=idx.device).view(1, q_len, 1)
            ok_cols = idx.unsqueeze(1) <= q_cols
        else:
            m = attend_mask(attention_mask)
            ok_cols = m[:, 0].expand(B, q_len, m.shape[-1]).gather(2, idx.unsqueeze(1).expand(B, q_len, K))
        ok_cols = (ok_cols & ok.unsqueeze(1)).unsqueeze(1).expand(B, Hkv, q_len, K)
        return masked_attention(query, keys, values, ok_cols, scaling)
