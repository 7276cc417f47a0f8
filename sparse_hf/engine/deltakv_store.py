"""DeltaKV in the engine: the compressor set-up, and the pool beside which the compressed tokens live.

Layout (``DeltaKVPool``, a :class:`~.kv_pool.KVPool` with two slot groups):

- group 0: the filter layers (``full_attn_layers``): every token raw, as OmniKV keeps them (table index ==
  position);
- group 1: the compressed layers: per row its ``num_sink_tokens`` sinks, then its recent buffer, raw. Once a
  row's buffer holds twice ``num_recent_tokens`` (the HF path's flush rule, :meth:`DeltaKV.flush_count`), its
  oldest buffer tokens become latents + father ids (+ raw centers) in a core
  :class:`~sparse_hf.deltakv.state.CompressedState` (one per compressed layer and row: ``DeltaKVStore``), and
  their raw slots go back to group 1's free stack (the memory win).

A row's table in group 1 is therefore ``[sinks, buffer]``: entry ``j`` holds position ``j`` for ``j < S`` and
``j + compressed`` after (compression always takes the oldest buffer tokens), so positions need no storage.

The compressor reads keys before RoPE (and before a key norm). The pool holds them after both; without a key norm a
flush recovers them by inverse RoPE (:func:`~sparse_hf.deltakv.rope.unrotate`). Behind Qwen3's ``k_norm``, which
cannot be undone, every group-1 slot also holds its token's pre-norm key (``DeltaKVPool.pre_norm_k``, written by
the model in the step that stores the slot, moved with it, counted in :func:`slot_costs`), as the HF path keeps the
k_proj output of its raw tokens.
"""

from __future__ import annotations

import torch

from ..deltakv.state import CompressedState
from .kv_pool import KVPool
from .model import model_family


def require_compressor(runtime) -> None:
    """Raise ``ValueError`` (saying what to pass) unless the engine's knobs name a compressor."""
    if runtime.compressor is None and not runtime.deltakv_path:
        raise ValueError("sparse_method='deltakv' needs a compressor: LLM(..., sparse_method='deltakv', "
                         "compressor=DeltaKVCompressor(...)) or deltakv_path='dir-or-hub-id' (or 'demo' / "
                         "'qwen-coder', the shipped ones)")


def prepare_deltakv(method, knobs: dict, hf_config):
    """``(method, projections)``: the method rebuilt with the compressor's trained knobs as defaults (the caller's
    explicit ``knobs`` win, as on the HF path), and the projections. Raises ``ValueError`` for a missing or
    mismatched compressor, a compressor lacking a compressed layer, or latent bits the latent width rejects."""
    from ..deltakv.compressor import resolve_compressor, serving_method

    _, runtime = type(method).build_config(**knobs)
    require_compressor(runtime)
    _, projections = resolve_compressor(runtime.compressor, runtime.deltakv_path, hf_config)
    method = serving_method(method, projections, {k for k in knobs if k not in ("compressor", "deltakv_path")})
    return method, projections


def keeps_pre_norm_keys(hf_config) -> bool:
    """Whether the model normalises keys before RoPE (Qwen3's ``k_norm``): then the compressed layers' raw slots
    also keep each token's pre-norm key (``DeltaKVPool(pre_norm_keys=True)``), which inverse RoPE cannot recover."""
    return model_family(hf_config) == "qwen3"


def compressed_bytes_per_token(method, projections, kv_dtype: torch.dtype) -> float:
    """An upper bound of the store's device bytes per compressed token and layer: its latent (as
    :func:`~sparse_hf.deltakv.quant.quantize` stores it; none with ``offload_latents``, which keeps latents in host
    memory), father ids (int32, the widest), its position, and its share of a raw center (``concat(K, V)`` of every KV
    head, one per ``step`` tokens)."""
    from ..deltakv.quant import quantize

    cl = method.clustering()
    latent = 0 if cl.offload_latents else quantize(torch.zeros(1, projections.latent_size, dtype=projections.dtype),
                                                   cl.quant_bits).nbytes()
    center = projections.kv_dim * torch.tensor([], dtype=kv_dtype).element_size() + 4
    return latent + 4 * cl.neighbor_count + 4 + center / cl.step


def slot_costs(method, projections, kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
               pre_norm_keys: bool = False) -> tuple[float, int, int]:
    """``(per_filter, per_compressed, per_row)``: the bytes of one slot of the filter group (its token raw in every
    filter layer, plus the compressed bytes it reserves in every compressed layer, see :func:`split_slots`), of one
    slot of the compressed layers' raw group (with ``pre_norm_keys`` its pre-norm key too, see
    :func:`keeps_pre_norm_keys`), and the raw slots every row holds there besides a prompt (its sinks and a buffer
    of up to ``2 * num_recent_tokens``)."""
    key = kv_heads * head_dim * torch.tensor([], dtype=kv_dtype).element_size()           # one token's K, one layer
    raw = 2 * key
    compressed = len(method.sparse_layers())
    c = method.config
    per_filter = (method.num_layers - compressed) * raw + compressed * compressed_bytes_per_token(
        method, projections, kv_dtype) + 4
    per_compressed = compressed * (raw + (key if pre_norm_keys else 0)) + 4
    return per_filter, per_compressed, c.num_sink_tokens + 2 * c.num_recent_tokens


#: ``deltakv_prefill="auto"``: group 1 keeps room for a raw prompt of up to this many tokens (chunked prefill, which
#: batches with decode rows); longer prompts run layer-wise (:mod:`.deltakv_layerwise`), which holds no prompt raw
#: in more than one compressed layer. 65,536 is the reference engine's threshold for its batch-1 long-prompt path;
#: for Qwen2.5-7B (21 compressed layers, bf16) that room costs 2.8 GB, 2.6% of an H200's 109 GB pool, and shorter
#: prompts keep batching with decode rows (a layer-wise prompt is a step of its own: decode rows wait during it).
AUTO_CHUNKED_TOKENS = 65536


def layerwise_bytes_per_token(kv_heads: int, head_dim: int, kv_dtype: torch.dtype, pre_norm_keys: bool = False,
                              hidden_size: int = 0, hidden_dtype: torch.dtype | None = None,
                              hidden_on_host: bool = False) -> int:
    """Transient device bytes per prompt token of a layer-wise prefill (:mod:`.deltakv_layerwise`): the staging K
    and V of one layer (``[n, Hkv, D]`` each; with ``pre_norm_keys`` the pre-norm keys too), plus the hidden
    states between layers (``[n, hidden]``) unless they live in host memory."""
    key = kv_heads * head_dim * torch.tensor([], dtype=kv_dtype).element_size()
    hidden = 0 if hidden_on_host else hidden_size * torch.tensor([], dtype=hidden_dtype or kv_dtype).element_size()
    return (3 if pre_norm_keys else 2) * key + hidden


def split_slots(budget_bytes: int, method, projections, kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
                max_model_len: int, max_rows: int, pre_norm_keys: bool = False, chunked_room: int | None = None,
                layerwise_per_token: float = 0) -> list[int]:
    """Slots per layer of the two groups ``[filter, compressed]`` that ``budget_bytes`` pays for.

    The compressed layers' raw group holds every row's sinks and buffer (``< S + 2 * recent``) plus room for
    ``chunked_room`` raw prompt tokens (default ``max_model_len``: a whole prompt, which the chunked prefill holds
    raw until it ends); the filter group gets the rest. With less room than ``max_model_len``, longer prompts run
    layer-wise: then ``layerwise_per_token * max_model_len`` bytes (its staging and hidden states,
    :func:`layerwise_bytes_per_token`) come off the budget first. Each filter slot also reserves its token's
    compressed bytes in every compressed layer, so the store can never outgrow the memory: a token is compressed
    only while it holds a filter slot, so admission by free slots counts both stores.
    ``pre_norm_keys``: the compressed group's slots also hold pre-norm keys (:func:`slot_costs`)."""
    per_filter, per_compressed, per_row = slot_costs(method, projections, kv_heads, head_dim, kv_dtype,
                                                     pre_norm_keys)
    room = max_model_len if chunked_room is None else min(chunked_room, max_model_len)
    need = room + max_rows * per_row
    if room < max_model_len:
        budget_bytes -= layerwise_per_token * max_model_len
    filt = int((budget_bytes - need * per_compressed) // per_filter)
    if filt < need:                          # too little memory for the split: one size for both groups
        filt = need = int(max(budget_bytes, 0) // (per_filter + per_compressed))
    return [filt, need]


def chunked_room(deltakv_prefill: str) -> int | None:
    """The ``chunked_room`` of :func:`split_slots` under the engine's ``deltakv_prefill`` knob: a whole prompt
    (``"chunked"``), none (``"layerwise"``), or :data:`AUTO_CHUNKED_TOKENS` (``"auto"``)."""
    return {"chunked": None, "layerwise": 0, "auto": AUTO_CHUNKED_TOKENS}[deltakv_prefill]


def runs_layerwise(deltakv_prefill: str, max_model_len: int) -> bool:
    """Whether some prompt up to ``max_model_len`` tokens may run layer-wise: the split then reserves its transient
    bytes, and a row may be as long as the filter group (not the compressed group) holds."""
    room = chunked_room(deltakv_prefill)
    return room is not None and room < max_model_len


def longest_prompt(budget_bytes: int, method, projections, kv_heads: int, head_dim: int,
                   kv_dtype: torch.dtype, pre_norm_keys: bool = False, layerwise_per_token: float | None = None) -> int:
    """The longest prompt one row can hold in ``budget_bytes`` (the largest ``max_model_len`` whose
    :func:`split_slots` at one row gives it room).

    Chunked prefill (``layerwise_per_token=None``): a prompt is held raw in every layer until it ends, so each of
    its tokens costs a filter slot *and* a compressed-group slot: more than a vanilla slot. Layer-wise prefill
    (``layerwise_per_token``: :func:`layerwise_bytes_per_token`): each token costs a filter slot plus its transient
    staging (and hidden-state) bytes; the compressed group only keeps the row's sinks and buffer."""
    args = (method, projections, kv_heads, head_dim, kv_dtype)
    per_filter, per_compressed, per_row = slot_costs(*args, pre_norm_keys)
    layerwise = layerwise_per_token is not None
    lo, hi = 0, int(budget_bytes // (per_filter if layerwise else per_filter + per_compressed)) + 2
    extra = dict(chunked_room=0, layerwise_per_token=layerwise_per_token) if layerwise else {}
    while lo + 1 < hi:                       # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        filt, need = split_slots(budget_bytes, *args, mid, 1, pre_norm_keys, **extra)
        fits = filt >= mid and need >= min(mid, per_row) if layerwise else min(filt, need) >= mid
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo


class DeltaKVStore:
    """The compressed tokens of every row: one core ``CompressedState`` (batch 1) per compressed layer and row,
    created at the row's first flush and dropped when the row is released. Every compressed layer of a row
    compresses the same tokens (one flush rule over the shared group-1 table), so one count per row serves all."""

    def __init__(self, layers: list[int], clustering):
        self.layers, self.clustering = list(layers), clustering
        self.states: dict[int, dict[int, CompressedState]] = {}       # row -> layer -> state
        #: Bumped whenever a state's tensors change (a flush, a released row): a captured decode step is stale.
        self.version = 0

    def count(self, row: int) -> int:
        """Compressed tokens of ``row`` (in each compressed layer)."""
        states = self.states.get(row)
        return states[self.layers[0]].counts[0] if states else 0

    def state(self, row: int, layer: int) -> CompressedState:
        states = self.states.setdefault(row, {})
        if layer not in states:
            states[layer] = CompressedState(1, self.clustering)
        return states[layer]

    def release(self, row: int) -> None:
        self.states.pop(row, None)
        self.version += 1

    def nbytes(self) -> int:
        """Device bytes of every latent, center, father id and position held (offloaded latents: :meth:`host_bytes`)."""
        return sum(sum(s.bytes_by_part().values()) for states in self.states.values() for s in states.values())

    def host_bytes(self) -> int:
        """Host bytes of the offloaded latents (``offload_latents``), else 0."""
        return sum(s.host_bytes() for states in self.states.values() for s in states.values())


class DeltaKVPool(KVPool):
    """The raw pool of DeltaKV (group 0: filter layers, group 1: compressed layers; see the module docstring) and
    its :class:`DeltaKVStore`. Releasing a row frees both; :meth:`check_whole` checks both.

    ``pre_norm_keys`` (a model with a key norm, :func:`keeps_pre_norm_keys`): ``pre_norm_k[layer]``
    ``[S1 + 1, Hkv, D]`` for each compressed layer, slot ``s`` the pre-norm (and pre-RoPE) key of the token in
    group-1 slot ``s``; the model writes it beside K/V (:meth:`DeltaKVAttention.store_pre_norm_keys`), :meth:`keep`
    moves it with its slot and a flush reads it instead of inverting RoPE. Empty without ``pre_norm_keys``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, group_slots: list[int], max_rows: int,
                 max_len: int, dtype: torch.dtype, device: torch.device, method, pre_norm_keys: bool = False):
        groups = [0 if method.is_full(layer) else 1 for layer in range(num_layers)]
        super().__init__(num_layers, num_kv_heads, head_dim, group_slots[0], max_rows, max_len, False, dtype, device,
                         layer_groups=groups, group_slots=group_slots[:max(groups) + 1])
        self.store = DeltaKVStore(method.sparse_layers(), method.clustering())
        self.pre_norm_k: dict[int, torch.Tensor] = {
            layer: torch.zeros_like(self.k[layer]) for layer in method.sparse_layers()} if pre_norm_keys else {}

    def slot_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        """K, V and (compressed layers, ``pre_norm_keys``) the pre-norm keys: what a slot move carries."""
        side = self.pre_norm_k.get(layer)
        return super().slot_tensors(layer) + ((side,) if side is not None else ())

    def raw_bytes(self) -> int:
        """Device bytes of the raw slots of every layer (K, V and the pre-norm keys), allocated up front."""
        return sum(t.numel() * t.element_size() for layer in range(self.num_layers) for t in self.slot_tensors(layer))

    def raw_positions(self, row: int, start: int, stop: int) -> list[int]:
        """RoPE positions of group-1 table entries ``start .. stop - 1`` of ``row`` (sinks, then the buffer after the
        compressed tokens)."""
        S, n = self.store.clustering.num_sink, self.store.count(row)
        return [j if j < S else j + n for j in range(start, stop)]

    def release_row(self, row: int) -> None:
        super().release_row(row)
        self.store.release(row)

    def allocate_groups(self, row: int, counts: list[int]) -> list[torch.Tensor]:
        """Append ``counts[g]`` new slots to the empty row ``row`` in each group ``g`` (unlike :meth:`allocate`, a
        different count per group: a layer-wise prefill keeps a prompt's every token in the filter layers but only
        its sinks and buffer in the compressed ones). Returns each group's new slot ids (``[counts[g]]`` long)."""
        if self.lens[:, row].any():
            raise RuntimeError(f"allocate_groups: row {row} already holds slots")
        if max(counts) > self.max_len or any(n > top for n, top in zip(counts, self.free_top)):
            raise RuntimeError(f"KV pool exhausted or row too long: {counts} slots needed, {self.free_top} free, "
                               f"table width {self.max_len} (scheduler bug)")
        out = []
        for g, n in enumerate(counts):
            top = self.free_top[g]
            slots = self.free[g, top - n:top].clone()
            self.free_top[g] = top - n
            self.tables[g, row, :n] = slots
            self.lens[g, row] = n
            out.append(slots.long())
        return out

    def row_tokens(self, row: int) -> int:
        """Raw slots of ``row`` over all layers plus its compressed tokens (each counted once per layer)."""
        return super().row_tokens(row) + self.store.count(row) * len(self.store.layers)

    def check_whole(self) -> None:
        super().check_whole()
        assert not self.store.states, f"rows {sorted(self.store.states)} still hold compressed tokens"
