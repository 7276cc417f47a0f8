"""``CompressedCache``: DeltaKV on the HF path.

Filter layers are raw :class:`SlotLayer` s (OmniKV's). Every other layer is a :class:`DeltaKVLayer`:

- raw tokens (the head: padding + sinks, and the recent buffer): post-RoPE K/V and positions; when a token is
  compressed, ``x = concat(K, V)`` before RoPE is formed from its V and its key with RoPE undone (behind a
  Qwen3 ``k_norm``, which cannot be undone, the k_proj output is kept for the raw tokens instead);
- compressed tokens: RoPE positions ``[B, N]``; for the non-centers also ``latent`` ``[B, N', latent]`` and
  ``fathers`` ``[B, N', k]`` (indices into the centers; offset ``j`` is row ``j - j // step - 1``); no K/V;
- centers: raw pre-RoPE ``x`` of the sinks and of every ``step``-th compressed token (offset ``j % step == 0``).

Logical columns are shared by the rows of a batch: the head covers every row's padding and sinks.
"""

from __future__ import annotations

import torch

from ..deltakv import DeltaKVCompressor
from ..deltakv.quant import QuantizedLatent, check_bits, dequantize, quantize
from ..deltakv.clustering import compress, nearest_centers, reconstruct, reference_from_fathers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attention import masked_attention, query_validity
from .layer import SlotLayer
from .selection_cache import HAS_TRITON, SelectionCache, sparse_decode_attention


def _cat(a, b, dim):
    return b if a is None else torch.cat([a, b], dim)


def _cat_ids(stored: torch.Tensor | None, ids: torch.Tensor, num_centers: int) -> torch.Tensor:
    """Append father ids ``[B, n, k]`` as int16 while the centers fit (< 32768; half the bytes), else int32."""
    dtype = torch.int16 if num_centers <= torch.iinfo(torch.int16).max else torch.int32
    if stored is not None and stored.dtype != dtype:
        stored = stored.to(torch.int32)
        dtype = torch.int32
    return _cat(stored, ids.to(dtype), 1)


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``k`` ``[B, Hkv, n, D]`` with ``cos``/``sin`` ``[B, n, D]`` (HF's rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return k * cos + rotated * sin


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate` (also with rope scaling folded into ``cos``/``sin``: divides by
    ``cos^2 + sin^2``), so pre-RoPE keys need not be stored: ``[B, Hkv, n, D]``."""
    return rotate(k, cos, -sin) / (cos * cos + sin * sin).unsqueeze(1)


class DeltaKVLayer(SlotLayer):
    """One compressed layer (see the module docstring). Reuses ``SlotLayer``'s HF cache API; its slot
    buffers hold only the raw tokens."""

    def __init__(self):
        super().__init__()
        self.raw_kpre = self.raw_pos = None       # [B, n_raw, Hkv*D] pre-norm keys (k_norm only), [B, n_raw] positions
        self.head_end = None                      # columns < head_end stay raw forever
        self.latent: QuantizedLatent | None = None  # [B, N, latent] codes (+ scales) per kv_quant_bits
        self.fathers = self.comp_pos = None
        self.num_compressed = 0
        self.center_x = self.center_valid = None  # [B, M, Dx], [B, M]
        self.center_cols = None                   # [M] logical columns of the centers
        self.num_head_centers = 0

    def append_raw_k(self, kpre: torch.Tensor | None, pos: torch.Tensor) -> None:
        """Record new raw tokens' positions and, when given (layers with ``k_norm``), their pre-norm keys."""
        if kpre is not None:
            self.raw_kpre = _cat(self.raw_kpre, kpre, 1)
        self.raw_pos = _cat(self.raw_pos, pos.to(torch.int32), 1)

    def allocated_bytes(self) -> int:
        return sum(self.bytes_by_part().values())

    def used_bytes(self) -> int:
        """Live raw slots plus everything beside them (latents, centers, ids, positions)."""
        return self.allocated_bytes() - SlotLayer.allocated_bytes(self) + super().used_bytes()

    def bytes_by_part(self) -> dict[str, int]:
        """Allocated bytes of this layer by part; :meth:`allocated_bytes` is their sum."""
        def size(*tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        return {"raw K/V + slot positions (sinks + buffer)": SlotLayer.allocated_bytes(self),
                "raw pre-norm keys (Qwen3 buffer)": size(self.raw_kpre), "raw positions": size(self.raw_pos),
                "latents": self.latent.nbytes() if self.latent is not None else 0,
                "centers": size(self.center_x), "father ids": size(self.fathers), "positions": size(self.comp_pos)}

    def kept_per_row(self) -> list[int]:
        raw = (self.positions[:, 0] >= 0).sum(-1)
        return (raw + self.num_compressed).tolist()

    def _index_batch(self, index):
        super()._index_batch(index)
        index = index.to(self.device)
        for name in ("raw_kpre", "raw_pos", "fathers", "comp_pos", "center_x", "center_valid"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])
        if self.latent is not None:
            self.latent = QuantizedLatent(*(t if t is None else t[index] for t in self.latent))


class CompressedCache(SelectionCache):
    """The ``deltakv`` cache. Knobs: OmniKV's plus ``compressor`` (a :class:`DeltaKVCompressor`) or
    ``deltakv_path`` (a directory or Hub id), ``cluster_ratio`` and ``deltakv_neighbor_count``."""

    needs_raw_keys = True

    def __init__(self, config, sparse_config=None, **knobs):
        super().__init__(config, sparse_config, **knobs)
        c, run = self.sparse_config, self.runtime
        if run.compressor is None and not run.deltakv_path:
            raise ValueError("deltakv needs a compressor: cache_config={'compressor': DeltaKVCompressor(...)} or "
                             "{'deltakv_path': 'dir-or-hub-id'}")
        comp = run.compressor if run.compressor is not None else DeltaKVCompressor.from_pretrained(run.deltakv_path)
        if not isinstance(comp, DeltaKVCompressor):
            raise ValueError(f"compressor must be a DeltaKVCompressor, got {type(comp).__name__}")
        comp.check_compatible(self.model_config)
        missing = [i for i in self.method.sparse_layers() if i not in comp.config.layer_indices]
        if missing:
            raise ValueError(f"the compressor has no weights for layers {missing}, which deltakv compresses "
                             f"(every layer not in full_attn_layers={list(self.method.full_layers)})")
        self.compressor = comp.eval()
        check_bits(c.kv_quant_bits, comp.config.kv_compressed_size)
        self.obs_scores = None
        # Clustering must match the compressor's training unless the caller overrides it.
        training = getattr(comp.config, "training", None) or {}
        trained = {}   # a new config: the caller's object is never modified
        if c.cluster_ratio is None:
            trained["cluster_ratio"] = float(training.get("cluster_ratio", 0.1))
        if c.deltakv_neighbor_count is None:
            trained["deltakv_neighbor_count"] = int(training.get("neighbor_count", 1))
        if trained:
            self.sparse_config = c.replace(**trained)
            self.method = type(self.method)(self.sparse_config, self.num_layers)

    def make_layer(self, layer_idx: int):
        return SlotLayer() if layer_idx in self.method.full_layers else DeltaKVLayer()

    def observe(self, logits, valid, length):
        self.obs_scores = self.method.decode_scores(logits, valid)
        self.selection = None

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        i = module.layer_idx
        raw_k = module.__dict__.pop("_sparse_hf_raw_k", None)
        if self.method.is_full(i):
            if query.shape[2] > 1 and self.method.is_observer(i):
                self.obs_scores = None
            return super().attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        layer = self.layers[i]
        B, H, q_len, D = query.shape
        # Pre-RoPE keys are recovered by inverse RoPE at flush time, except behind a k_norm (Qwen3), which
        # cannot be inverted: there the k_proj output is kept for the raw buffer.
        keep_pre_norm = getattr(module, "k_norm", None) is not None
        if keep_pre_norm and raw_k is None:
            raise RuntimeError("deltakv needs the pre-norm keys; call sparse_hf.prepare_model(model) first")
        # Follow the model's device; checked until the first compression and at each prefill, not every step.
        if (q_len > 1 or layer.head_end is None) and self.compressor.device != query.device:
            self.compressor.to(query.device)
        pos = kwargs.get("position_ids")
        pos = pos.expand(B, q_len) if pos is not None else torch.arange(layer.seen - q_len, layer.seen,
                                                                       device=query.device).expand(B, q_len)
        layer.append_raw_k(raw_k.reshape(B, q_len, -1) if keep_pre_norm else None, pos)
        if attention_mask is not None and layer.head_end is None:
            layer.drop_padding(attention_mask)
        out = self._attend_layer(module, layer, query, attention_mask, scaling, q_len)
        if self.prompt_complete(layer):
            self._flush(module, layer)
        return out, None

    # -- attention ------------------------------------------------------------------------------------------------
    def _attend_layer(self, module, layer, query, attention_mask, scaling, q_len):
        if layer.head_end is None:
            # Nothing compressed yet: slots are the logical columns, so HF's mask and SDPA kernels apply as is
            # (no [q, n] mask of our own, which at a long prompt would not fit in memory).
            return sdpa_attention_forward(module, query, layer.keys, layer.values, attention_mask,
                                          scaling=scaling)[0]
        keys, values, cols = layer.keys, layer.values, layer.positions
        if layer.num_compressed:
            pick = None
            if q_len == 1 and self.obs_scores is not None:
                start = layer.head_end
                pick = self.method.pick(self.obs_scores[:, start:start + layer.num_compressed],
                                        layer.num_compressed, layer.seen)
            rk, rv, rcols = self._rebuild(module, layer, pick)
            keys, values = torch.cat([keys, rk], 2), torch.cat([values, rv], 2)
            cols = torch.cat([cols, rcols], 2)                # rebuilt columns are >= 0: all attended
        if q_len == 1 and query.is_cuda and HAS_TRITON:   # decode on GPU: Triton, not SDPA's per-shape dispatch
            return sparse_decode_attention(query[:, :, 0], keys, values, cols, scale=scaling,
                                           dense=True).unsqueeze(1)
        valid = cols >= 0
        q_cols = torch.arange(layer.seen - q_len, layer.seen, device=query.device).view(1, 1, q_len, 1)
        allowed = (cols.unsqueeze(2) <= q_cols) & valid.unsqueeze(2)
        if attention_mask is not None:   # padding queries of a prefill chunk: keep SDPA away from empty rows
            allowed = allowed | ~query_validity(attention_mask, q_len, layer.seen, query.shape[0],
                                                query.device).view(query.shape[0], 1, q_len, 1)
        return masked_attention(query, keys, values, allowed, scaling)

    def _rebuild(self, module, layer, pick):
        """Rebuild compressed tokens ``pick`` (``[B, k]`` offsets; ``None`` = all) as post-RoPE K/V."""
        B, Hkv = layer.keys.shape[:2]
        D = layer.keys.shape[-1]
        n = layer.num_compressed
        if pick is None:
            pick = torch.arange(n, device=layer.center_x.device).expand(B, n)
        k, step = pick.shape[1], self.method.step
        center = self.method.is_center(pick)              # centers are stored raw: use them as they are
        cidx = (layer.num_head_centers + pick // step).clamp(max=layer.center_x.shape[1] - 1)
        x = layer.center_x.gather(1, cidx.unsqueeze(-1).expand(B, k, layer.center_x.shape[-1]))
        if layer.fathers is not None:                     # latents exist for the non-center offsets only
            row = (pick - pick // step - 1).clamp(0, layer.fathers.shape[1] - 1)
            latent = dequantize(layer.latent.select(row), self.compressor.dtype)
            fathers = layer.fathers.gather(1, row.unsqueeze(-1).expand(B, k, layer.fathers.shape[-1])).long()
            ref = reference_from_fathers(layer.center_x, fathers)
            rebuilt = reconstruct(latent, ref, self.compressor, module.layer_idx)   # in center_x's dtype
            x = torch.where(center.unsqueeze(-1), x, rebuilt)
        kx, vx = x[..., : Hkv * D].view(B, k, Hkv, D), x[..., Hkv * D:].view(B, k, Hkv, -1)
        if getattr(module, "k_norm", None) is not None:
            kx = module.k_norm(kx)
        pos = layer.comp_pos.gather(1, pick).long()
        cos, sin = module.__dict__["_sparse_hf_rotary"](vx, pos)
        keys = rotate(kx.transpose(1, 2), cos.to(kx.dtype), sin.to(kx.dtype))
        cols = (layer.head_end + pick).unsqueeze(1).expand(B, Hkv, k)
        return keys.to(layer.keys.dtype), vx.transpose(1, 2).to(layer.values.dtype), cols

    # -- compression ----------------------------------------------------------------------------------------------
    @staticmethod
    def _raw_x(module, layer, start: int, end: int) -> torch.Tensor:
        """``x = concat(K, V)`` before RoPE (and k_norm) of raw slots ``start:end``: ``[B, end - start, Dx]``."""
        B, n = layer.values.shape[0], end - start
        v = layer.values[:, :, start:end].transpose(1, 2).reshape(B, n, -1)
        if layer.raw_kpre is not None:
            k = layer.raw_kpre[:, start:end]
        else:
            post = layer.keys[:, :, start:end].float()
            cos, sin = module.__dict__["_sparse_hf_rotary"](post, layer.raw_pos[:, start:end].long())
            k = unrotate(post, cos.float(), sin.float()).transpose(1, 2).reshape(B, n, -1)
        return torch.cat([k.to(layer.values.dtype), v], -1)

    def _flush(self, module, layer) -> None:
        """Compress the oldest raw-buffer tokens once the buffer holds twice ``num_recent_tokens``."""
        c = self.sparse_config
        if layer.head_end is None:
            first_valid = (layer.positions[:, 0] < 0).sum(-1).max()
            layer.head_end = int(first_valid) + c.num_sink_tokens
            head = min(layer.head_end, layer.num_slots)
            layer.center_x = self._raw_x(module, layer, 0, head)
            layer.center_valid = layer.positions[:, 0, :head] >= 0
            layer.center_cols = torch.arange(head, device=layer.center_x.device)
            layer.num_head_centers = head
        start = layer.head_end + layer.num_compressed        # first buffer column
        buffered = layer.seen - start
        count = self.method.flush_count(buffered)
        if count == 0:
            return
        first = layer.num_slots - buffered                   # slot of the first buffer token
        x = self._raw_x(module, layer, first, first + count)
        pos = layer.raw_pos[:, first:first + count]
        cols = torch.arange(start, start + count, device=x.device)
        rel = cols - layer.head_end
        is_center = self.method.is_center(rel)
        B = x.shape[0]
        layer.center_x = torch.cat([layer.center_x, x[:, is_center]], 1)
        layer.center_valid = torch.cat([layer.center_valid, is_center[is_center].expand(B, -1)], 1)
        layer.center_cols = torch.cat([layer.center_cols, cols[is_center]])
        other = ~is_center                                   # only these get a latent and fathers
        if bool(other.any()):
            xo = x[:, other]
            fathers = nearest_centers(xo, layer.center_x, cols[other].expand(B, -1),
                                      layer.center_cols.expand(B, -1), c.deltakv_neighbor_count,
                                      center_valid=layer.center_valid)
            with torch.no_grad():
                latent = compress(xo, reference_from_fathers(layer.center_x, fathers), self.compressor,
                                  module.layer_idx)
            stored = quantize(latent, c.kv_quant_bits)
            layer.latent = stored if layer.latent is None else layer.latent.cat(stored)
            layer.fathers = _cat_ids(layer.fathers, fathers, layer.center_x.shape[1])
        layer.comp_pos = _cat(layer.comp_pos, pos, 1)
        layer.num_compressed += count
        keep = torch.cat([torch.arange(first, device=x.device),
                          torch.arange(first + count, layer.num_slots, device=x.device)])
        if layer.raw_kpre is not None:
            layer.raw_kpre = layer.raw_kpre[:, keep]
        layer.raw_pos = layer.raw_pos[:, keep]
        Hkv = layer.keys.shape[1]
        idx = keep.view(1, 1, -1).expand(B, Hkv, -1)
        layer.keep(idx, layer.positions.gather(2, idx) >= 0)
