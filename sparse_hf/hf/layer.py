"""A cache layer whose slots are a subset of the logical sequence.

Each slot stores a post-RoPE key/value and the *logical column* it came from (its index in the
full, padded sequence that Hugging Face builds masks for). Buffers are preallocated and grow in
chunks, so a decode step writes one slot instead of concatenating the whole cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from sparse_hf.kernels import append_kv

from .attention import attend_mask, column_validity


class CacheCropError(ValueError):
    """A sparse-hf cache was asked to roll back (``crop``) after it had evicted tokens."""


class SlotLayer(CacheLayerMixin):
    """Physical K/V slots plus their logical positions.

    Attributes:
        keys, values: ``[B, Hkv, n, D]`` views of the live slots (``n = num_slots``).
        positions: ``[B, Hkv, n]`` long, logical column of each slot; ``-1`` marks an empty slot.
        seen: logical length (tokens the layer has been given, padding columns included).
        compacted: ``True`` once slots are no longer the identity ``0..seen-1``.
    """

    is_compileable = False
    is_croppable = True        # ``crop`` works until tokens were evicted; then it raises CacheCropError
    is_sliding = False

    def __init__(self):
        super().__init__()
        self._k = self._v = self._pos = None
        self.num_slots = 0
        self.seen = 0
        self.compacted = False
        self.reserve = 0           # extra slots for the tokens to come, on the first allocation and after eviction
        self.max_slots = None      # slots the layer never exceeds during decode (StreamingLLM's window), if bounded
        self.query_window = None   # [B, H, W, D] last prompt queries, for scoring methods
        self.query_valid = None    # [B, W] bool
        self.frozen = False        # decode mode: fixed buffers, device-side counters (CUDA-graph safe)
        self.n_dev = self.seen_dev = None

    # -- storage ---------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, pos)``: the whole preallocated slot buffers, ``[B, Hkv, capacity, D]`` and ``[B, Hkv, capacity]``
        (empty slots have position -1). Decode kernels read them in place."""
        return self._k, self._v, self._pos

    def buffer_signature(self) -> tuple:
        """Addresses of every buffer a decode step reads or writes, and the capacity: a captured CUDA graph is
        valid only while this is unchanged."""
        return (self._k.data_ptr(), self._v.data_ptr(), self._pos.data_ptr(), self._counters.data_ptr(),
                self.capacity)

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def _refresh_views(self) -> None:
        n = self.num_slots
        self.keys, self.values, self.positions = self._k[:, :, :n], self._v[:, :, :n], self._pos[:, :, :n]

    def _allocate(self, batch, kv_heads, head_dim, v_dim, capacity):
        k = torch.empty(batch, kv_heads, capacity, head_dim, dtype=self.dtype, device=self.device)
        v = torch.empty(batch, kv_heads, capacity, v_dim, dtype=self.dtype, device=self.device)
        pos = torch.full((batch, kv_heads, capacity), -1, dtype=torch.long, device=self.device)
        return k, v, pos

    def _capacity_for(self, needed: int, first: bool) -> int:
        """Slots to allocate for ``needed`` live ones: ``reserve`` more on a first allocation (the prompt, or the
        kept tokens after eviction), else geometric growth (a quarter, at least 64), so decode reallocates
        rarely and stays static-shaped in between. Never above ``max_slots`` (when set) unless ``needed`` is."""
        capacity = needed + (self.reserve if first else max(64, needed // 4))
        if self.max_slots is not None:
            capacity = min(capacity, max(needed, self.max_slots))
        return max(capacity, needed)

    def _ensure_capacity(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        if needed <= self.capacity:
            return
        B, Hkv, _, D = like_k.shape
        k, v, pos = self._allocate(B, Hkv, D, like_v.shape[-1], self._capacity_for(needed, self._k is None))
        if self._k is not None and self.num_slots:
            n = self.num_slots
            k[:, :, :n], v[:, :, :n], pos[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n], self._pos[:, :, :n]
        self._k, self._v, self._pos = k, v, pos
        if self.frozen:
            self.freeze()   # new buffers: new index range (any captured graph must be re-captured)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, q, D]`` new keys/values at logical columns ``seen .. seen+q-1``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        n = self.num_slots
        if self.frozen and q == 1 and n < self.capacity:
            return self._append_one(key_states, value_states)
        self._ensure_capacity(n + q, key_states, value_states)
        self._k[:, :, n:n + q] = key_states
        self._v[:, :, n:n + q] = value_states
        cols = torch.arange(self.seen, self.seen + q, device=self.device)
        self._pos[:, :, n:n + q] = cols
        self.num_slots += q
        self.seen += q
        self._refresh_views()
        if self.frozen:
            self.n_dev.fill_(self.num_slots)
            self.seen_dev.fill_(self.seen)
        return self.keys, self.values

    # -- decode mode -------------------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Enter decode mode: appends write at a device-side slot counter, so a decode step has static shapes
        and no host-device sync and can be captured in a CUDA graph. Called once the prompt is complete."""
        if self._k is None:
            return
        if self.n_dev is None or self.n_dev.device != self._k.device:
            self._counters = torch.zeros(2, dtype=torch.long, device=self._k.device)   # (slots, seen): one add
            self.n_dev, self.seen_dev = self._counters[0:1], self._counters[1:2]
        self.n_dev.fill_(self.num_slots)
        self.seen_dev.fill_(self.seen)
        self.frozen = True

    def _append_one(self, key_states, value_states):
        # K, V and position at the device-side slot counter, then both counters + 1 (Triton on GPU: 2 launches)
        append_kv(self._k, self._v, self._pos, self._counters, key_states, value_states,
                  backend="auto" if key_states.is_cuda else "torch")
        self.advance(1)
        return self.keys, self.values

    def advance(self, steps: int) -> None:
        """Move the host-side mirrors of the counters (a CUDA-graph replay updates only the device ones)."""
        self.num_slots += steps
        self.seen += steps
        self._refresh_views()

    def full_valid(self) -> torch.Tensor:
        """``[B, capacity]`` bool: live slots of KV head 0 (layers whose slots are shared by all heads)."""
        return self._pos[:, 0] >= 0

    def keep(self, idx: torch.Tensor, ok: torch.Tensor) -> None:
        """Keep only slots ``idx`` (``[B, Hkv, K]``); entries with ``ok == False`` become empty slots.

        The old buffers are released, so the memory really shrinks to ``K + reserve`` slots (in decode mode the
        buffers stay, so that a captured CUDA graph stays valid).
        """
        B, Hkv, K = idx.shape
        D, Dv = self.keys.shape[-1], self.values.shape[-1]
        new_k = self.keys.gather(2, idx.unsqueeze(-1).expand(B, Hkv, K, D))
        new_v = self.values.gather(2, idx.unsqueeze(-1).expand(B, Hkv, K, Dv))
        new_pos = torch.where(ok, self.positions.gather(2, idx), torch.full_like(idx, -1))
        if self.frozen:   # decode mode: same buffers (a captured CUDA graph stays valid)
            k, v, pos = self._k, self._v, self._pos
            pos[:, :, K:] = -1
        else:
            k, v, pos = self._allocate(B, Hkv, D, Dv, self._capacity_for(K, first=True))
        k[:, :, :K], v[:, :, :K], pos[:, :, :K] = new_k, new_v, new_pos
        self._k, self._v, self._pos = k, v, pos
        self.num_slots = K
        if self.frozen:
            self.n_dev.fill_(K)
        self.compacted = True
        self._refresh_views()

    def drop_invalid(self, valid: torch.Tensor) -> None:
        """Mark slots where ``valid`` (``[B, Hkv, n]``) is False (padding) as empty, without moving data."""
        self._pos[:, :, :self.num_slots].masked_fill_(~valid, -1)

    def drop_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Mark the padding columns of HF's 4D mask (read from its last query row) as empty slots."""
        B, Hkv = self._pos.shape[:2]
        self.drop_invalid(column_validity(attention_mask, B, self.seen, self._pos.device)
                          .unsqueeze(1).expand(B, Hkv, self.seen))

    def valid(self) -> torch.Tensor:
        """``[B, Hkv, n]`` bool: slots holding a token (padding columns still count; see ``slot_mask``)."""
        return self.positions >= 0

    # -- masks ---------------------------------------------------------------------------------------------
    def slot_mask(self, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor:
        """The attention mask over the live slots, ``[B, Hkv, q, n]`` bool (True = attend).

        ``attention_mask`` is the mask Hugging Face built for the full logical length (``[B, 1, q, seen]``,
        bool or additive float) or ``None``; we pick the column of each slot and drop empty slots.
        """
        pos = self.positions
        B, Hkv, n = pos.shape
        safe = pos.clamp_min(0)
        if attention_mask is None:
            q_cols = torch.arange(self.seen - q_len, self.seen, device=pos.device).view(1, 1, q_len, 1)
            allowed = safe.unsqueeze(2) <= q_cols
        else:
            m = attend_mask(attention_mask)
            m = m.expand(B, Hkv, q_len, m.shape[-1])
            allowed = m.gather(3, safe.unsqueeze(2).expand(B, Hkv, q_len, n))
        return allowed & (pos >= 0).unsqueeze(2)

    def remember_queries(self, queries: torch.Tensor, query_valid: torch.Tensor, window: int) -> None:
        """Keep the last ``window`` queries (``[B, H, q, D]``) across prefill chunks for scoring."""
        if self.query_window is not None and queries.shape[2] < window:
            queries = torch.cat([self.query_window, queries], dim=2)
            query_valid = torch.cat([self.query_valid, query_valid], dim=1)
        self.query_window = queries[:, :, -window:].detach()
        self.query_valid = query_valid[:, -window:]

    # -- HF cache API ----------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def _index_batch(self, index: torch.Tensor) -> None:
        if self._k is None:
            return
        index = index.to(self._k.device)
        self._k, self._v, self._pos = self._k[index], self._v[index], self._pos[index]
        if self.frozen:
            self.freeze()
        if self.query_window is not None:
            self.query_window, self.query_valid = self.query_window[index], self.query_valid[index]
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._index_batch(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Remove ``-max_length`` tokens from the end when negative (0: nothing), or keep the first ``max_length``
        when positive (the older Transformers convention), as ``DynamicCache.crop`` does; assisted and
        prompt-lookup generation use it to undo rejected draft tokens.

        Possible while slots are still the logical columns (nothing evicted or compacted); after an eviction the
        layer cannot be put back as it was, so this raises :class:`CacheCropError` instead of going silently wrong.
        """
        max_length = int(max_length)   # some Transformers versions pass a 0-d tensor
        if max_length <= 0:
            max_length = self.seen - abs(max_length)
        if self.seen <= max_length:
            return
        if type(self) is not SlotLayer:   # subclasses keep more per-token state (DeltaKV): they override crop
            raise CacheCropError(f"{type(self).__name__} cannot roll back tokens (assisted or prompt-lookup "
                                 "generation needs that): generate without assistant_model / prompt_lookup_num_tokens")
        if self.compacted or self.num_slots != self.seen:
            raise CacheCropError(
                "this sparse-hf cache has already evicted or compressed tokens, so it cannot be rolled back to "
                f"{max_length} tokens (assisted or prompt-lookup generation needs that). Use a budget that covers "
                "the prompt, method='omnikv' (which never evicts), or generate without an assistant / "
                "prompt_lookup_num_tokens.")
        self._pos[:, :, max_length:self.num_slots] = -1
        self.num_slots = self.seen = max(0, max_length)
        self._refresh_views()
        if self.frozen:
            self.n_dev.fill_(self.num_slots)
            self.seen_dev.fill_(self.seen)

    # -- accounting ------------------------------------------------------------------------------------------
    def allocated_bytes(self) -> int:
        """Bytes of the slot buffers: K, V and the per-head position table (int64), preallocated room included, and
        the decode-mode counters."""
        if self._k is None:
            return 0
        counters = getattr(self, "_counters", None) if self.frozen else None
        return sum(t.numel() * t.element_size() for t in (self._k, self._v, self._pos, counters) if t is not None)

    def used_bytes(self) -> int:
        """Bytes of the live slots' K, V and positions."""
        if self._k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))
