"""``CompressedCache``: DeltaKV on the HF path, a thin adapter over the core :mod:`sparse_hf.deltakv.state`.

Filter layers are raw :class:`SlotLayer` s (OmniKV's). Every other layer is a :class:`DeltaKVLayer`:

- raw tokens (each row's sinks and recent buffer) in the slot buffers: post-RoPE K/V and logical columns, plus
  their RoPE positions (``raw_pos``) and, behind a Qwen3 ``k_norm`` (which cannot be undone), the k_proj output
  (``raw_kpre``); other models recover pre-RoPE keys by inverse RoPE when a token is compressed;
- compressed tokens in a :class:`~sparse_hf.deltakv.state.CompressedState` (latents, father ids, raw centers).

Each row compresses its own tokens: its sinks are its first ``num_sink_tokens`` real tokens and its buffer is
flushed by its own count, so a row's output does not depend on the other rows (or their padding).

Decode with static shapes (``static_decode``): once the prompt is complete a layer is frozen (appends at a
device-side slot counter). A one-token step picks the filter layer's top compressed tokens once for all layers
(:meth:`DeltaKV.pick_static`, no host value of the length), and each compressed layer copies its raw slots into the
cache's :class:`SharedScratch`, rebuilds the picks after them with the fused kernel
(:func:`sparse_hf.kernels.deltakv_rebuild_kv`) and attends over both in one dense sparse-decode pass: no host sync,
no new buffer, so a CUDA graph captures it. A flush (every ``num_recent_tokens`` steps per row) runs after its step
(inside ``attend`` eagerly, in :meth:`CompressedCache.maintain_layer` after a replay).

With a plan (:meth:`CompressedCache.plan_generation`: ``generate`` makes one when decode runs from CUDA graphs, from
``max_new_tokens``) the capacity is fixed: the compressed state, raw slots, filter layers and scratch are sized for
the final length at the prompt's end, a flush writes into the same tensors, and the scratch width stays the largest
any step needs (the kernels mask the rest by the device-side counts), so one captured graph serves every flush.
Without a plan a flush makes new state tensors, so the graph is captured again at the next step
(``DeltaKVLayer.buffer_signature``), and it sizes the scratch up to the next flush.
:meth:`CompressedCache.eager_step_reason` names the steps that must run eagerly (a scratch re-size at a step's start,
a step after a non-static one).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_hf.kernels import decode_attention_with_scores, deltakv_stage_raw
from sparse_hf.kernels.deltakv_pick import deltakv_pick_columns, deltakv_pick_scores
from sparse_hf.kernels.dispatch import kernels_run_fused
from sparse_hf.kernels.omnikv_scores import range_softmax_max, range_softmax_max_kernel_runs

from ..config import MethodConfig, cache_config_dict
from ..deltakv.compressor import resolve_compressor, serving_method
from ..deltakv.offload import LatentPrefetch
from ..deltakv.quant import quantize
from ..deltakv.state import rebuild_kv
from .attention import masked_attention, query_validity
from .deltakv_flush import PromptFlush, _FlushPlan
from .deltakv_layer import DeltaKVLayer, SharedScratch
from .layer import SlotLayer
from .selection_cache import SelectionCache, sparse_decode_attention


def _explicit_knobs(sparse_config, knobs: dict) -> set[str]:
    """Knobs the caller set: the keyword knobs, the keys of a dict or ``SparseConfig``, or the fields of a method
    config object that differ from their default."""
    if knobs:
        return set(knobs)
    if isinstance(sparse_config, MethodConfig):
        return {f.name for f in dataclasses.fields(sparse_config)
                if f.default is not dataclasses.MISSING and getattr(sparse_config, f.name) != f.default}
    return set(cache_config_dict(sparse_config))


class CompressedCache(PromptFlush, SelectionCache):
    """The ``deltakv`` cache. Knobs: OmniKV's plus ``compressor`` (a :class:`DeltaKVCompressor` or the core
    :class:`DeltaKVProjections`) or ``deltakv_path`` (a directory or Hub id), ``cluster_ratio``,
    ``deltakv_neighbor_count`` and ``cluster_metric``. Every clustering knob the compressor was trained with
    (sinks, cluster ratio, neighbour count, metric) is the default; the caller's config is never changed.

    ``offload_latents=True`` keeps the latents (and their int8/int4 scales) in pinned host memory
    (:mod:`sparse_hf.deltakv.offload`); father ids, centers, positions and the raw tokens stay on the GPU. The GPU
    reads the picked latents in place across PCIe, so eager and CUDA-graph decode (``cuda_graph=True``) both work
    with it, unchanged: each compressed layer's gather reads its picked latents from host memory in its own turn.
    ``prefetch_offloaded = True`` instead gathers every compressed layer's picks on a side stream as soon as the
    first compressed layer has the pick, each layer waiting on its own event; it is off because it measured slower
    (H200, Qwen2.5-7B shape, 131072 x 1, int4 latents: 67.3 tok/s with it, 77.6 without, 88.0 with the latents on
    the GPU; docs/benchmarks.md "Latents on the host"). On CPU the latents stay in ordinary memory, through the
    same code."""

    needs_raw_keys = True
    static_decode = True   # one-token decode steps take the static-shape path (False: the concatenating one)
    prefetch_offloaded = False  # offload_latents: gather a static step's picked latents on a side stream, ahead
                                # (off: slower on the H200, see above)

    def __init__(self, config, sparse_config=None, **knobs):
        super().__init__(config, sparse_config, **knobs)
        self.clustering = self.method.clustering()
        self.obs_scores = None
        self.raw_keys: dict[int, torch.Tensor] = {}   # layer -> k_proj output of the current forward (hook-fed)
        self._over_budget_at = None                   # (length, [B, top] bool) of the current decode step
        self._pick_memo = None                        # (scores, host key, (pick, cols)): shared by a step's layers
        self._modules: dict[int, torch.nn.Module] = {}   # compressed layer -> its attention module
        self._prefetch = LatentPrefetch() if self.clustering.offload_latents else None
        self.planned_length: int | None = None        # plan_generation: the logical length decode will reach
        self._announced: tuple[int, int] | None = None   # (prompt, new tokens) from generate, until the device is known
        self._pad_memo = None                         # (mask, length, padding): a padded prompt's, see _padding
        self._counts_memo = None                      # (length, padding, counts, answer): see _flush_counts
        self._forward = 0                             # + 1 at each forward's first layer (keys the flush plan)
        self._plan: _FlushPlan | None = None          # the latest flush's index work, see _flush_plan

    def serving_method(self, method, sparse_config, knobs: dict):
        """Resolve the compressor, then serve with its training knobs and calibrated filter layers unless the
        caller set them (a new config: the caller's stays as it was). Runs before the layers are made, since the
        filter layers decide which layers are compressed."""
        run = self.runtime
        method.check_runtime(run)
        self.compressor, self.projections = resolve_compressor(run.compressor, run.deltakv_path, self.model_config)
        return serving_method(method, self.projections, _explicit_knobs(sparse_config, knobs))

    # -- fixed capacity (CUDA graphs) --------------------------------------------------------------------------------
    def announce_new_tokens(self, max_new_tokens: int | None, prompt_length: int) -> None:
        """As for every cache; and when decode will run from CUDA graphs (``cuda_graph=True``, or the automatic
        default on a CUDA device: decided at the prompt's first :meth:`update`, which knows the device) with a known
        ``max_new_tokens``, :meth:`plan_generation`, so that no flush re-allocates what a captured step reads."""
        super().announce_new_tokens(max_new_tokens, prompt_length)
        self._announced = None
        if self.cuda_graph is not False and max_new_tokens:
            self._announced = (int(prompt_length), int(max_new_tokens))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:                   # a new forward: no flush plan of an earlier one is reused
            self._forward += 1
            self._plan = None
        if self._announced is not None:   # the prompt's first K/V: before any layer allocates its slots
            prompt, new = self._announced
            self._announced = None
            if self.cuda_graph or key_states.is_cuda:
                self.plan_generation(prompt, new)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def plan_generation(self, prompt_length: int, new_tokens: int) -> None:
        """Reserve, up front, every buffer a decode step reads for a generation of ``new_tokens`` after a prompt of
        ``prompt_length`` logical columns (padding included), so that flushes write into the same tensors and a
        captured CUDA graph stays valid (one capture per batch shape instead of one per flush):

        - each compressed layer's :class:`CompressedState` gets the capacity of the most tokens a row can have
          compressed at that length (latents, scales, centers, father ids, positions; the host store with
          ``offload_latents``), allocated at the prompt's end, before any flush;
        - the raw slots take their whole bound (sinks + two recent buffers), the filter layers room for every new
          token;
        - the scratch holds the most tokens any step until then rebuilds (with a fraction budget, the budget at the
          final length); steps that need fewer mask the rest on the device (``-1`` columns).

        The memory is allocated up front, so ``kv_usage`` reports it from the prompt's end: what the generation's
        final length needs, no more (if it stops early, the unused room stays reserved). Called by ``generate`` when
        decode runs from graphs (see :meth:`announce_new_tokens`); a caller that drives decode itself (``sparse-hf
        bench``) may call it before the prompt. Without a plan (e.g. a cache built and driven by hand) the state
        grows at each flush and the graph is captured again after it, as before. Decoding past the planned length stays correct: the state
        then grows again (and graphs are re-captured)."""
        if prompt_length < 0 or new_tokens < 0:
            raise ValueError(f"plan_generation({prompt_length}, {new_tokens}): expected non-negative lengths")
        self.planned_length = int(prompt_length) + int(new_tokens)
        self.set_reserve(int(new_tokens) + 1)
        for layer in self.layers:
            if isinstance(layer, DeltaKVLayer) and layer.state is not None:   # a continued generation
                self._reserve_state(layer)

    def _planned_compressed(self) -> int:
        """The most compressed tokens a row holds at the planned length: a multiple of ``num_recent_tokens`` (flushes
        compress whole buffers) that leaves the sinks and at least one recent buffer raw."""
        recent = self.sparse_config.num_recent_tokens
        return max(0, (self.planned_length - self.clustering.num_sink - recent) // recent * recent)

    def _reserve_state(self, layer) -> None:
        """Give ``layer``'s state the planned capacity and allocate it now (eagerly, between steps)."""
        state = layer.state
        cap = max(self._planned_compressed(), state.width)
        if not cap or cap == state.capacity:
            return
        state.reserve(cap)
        B, Hkv, _, D = layer.keys.shape
        like = layer.values.new_empty(B, 0, Hkv * (D + layer.values.shape[-1]))
        latent = quantize(torch.zeros(B, 0, self.projections.latent_size, dtype=self.projections.dtype,
                                      device=like.device), self.clustering.quant_bits)
        state.allocate(like, latent)
        layer.set_columns()

    def make_layer(self, layer_idx: int):
        if layer_idx in self.method.full_layers:
            return SlotLayer()
        if not hasattr(self, "shared_scratch"):     # one work buffer for every compressed layer; the first counts it
            self.shared_scratch = SharedScratch()
            return DeltaKVLayer(self.shared_scratch, reports_shared=True)
        return DeltaKVLayer(self.shared_scratch, reports_shared=False)

    def set_reserve(self, tokens: int) -> None:
        """As for every cache, but a compressed layer's raw slots never need more than its sinks and two recent
        buffers (a flush leaves one): their room stops there, which keeps the per-step copy to the shared scratch
        small."""
        super().set_reserve(tokens)
        bound = self.clustering.num_sink + 2 * self.sparse_config.num_recent_tokens
        for layer in self.layers:
            if isinstance(layer, DeltaKVLayer):
                layer.max_slots = bound
                if self.planned_length is not None:   # a plan: the whole bound at once, no growth during decode
                    layer.reserve = bound

    def maintain_layer(self, layer_idx: int) -> None:
        """After a replayed decode step (a CUDA graph runs no Python): the raw-buffer flush that the step's attention
        runs eagerly. A flush changes only this layer's state for later steps, so flushing after the whole step
        gives the outputs of flushing right after the layer's attention; the flush step itself replays."""
        layer = self.layers[layer_idx]
        module = self._modules.get(layer_idx)
        if isinstance(layer, DeltaKVLayer) and module is not None and self.prompt_complete(layer):
            self._flush(module, layer)

    def observe(self, logits, valid, length):
        self.obs_scores = self.method.pool_scores(self.method.decode_scores(logits, valid), present=valid)
        self.selection = None

    def _decode_full(self, module, layer, query, key, value, attention_mask, scaling, **kwargs):
        """As for OmniKV; at an observation layer's GPU decode step the scores come from two Triton passes over the
        logits (:func:`range_softmax_max`: a row's candidates are one slot range) instead of ~20 torch ops over
        ``[B, H, L]`` float32, when the layer's valid slots are each row's ``[pad, seen)`` (left padding)."""
        if self.method.is_observer(module.layer_idx) and layer.frozen and kernels_run_fused(query):
            start = self._candidate_start(layer)
            if start is not None:
                out, logits = decode_attention_with_scores(query[:, :, 0], *layer.buffers[:2],
                                                           valid=layer.full_valid(), scale=scaling)
                if range_softmax_max_kernel_runs(logits):
                    self.obs_scores = self.method.pool_scores(self.range_scores(layer, logits, start))
                    self.selection = None
                    return out.unsqueeze(1)
                self.observe(logits, layer.full_valid(), layer.seen)
                return out.unsqueeze(1)
        return super()._decode_full(module, layer, query, key, value, attention_mask, scaling, **kwargs)

    def range_scores(self, layer, logits: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` the observer's scores (``method.decode_scores`` of ``logits [B, H, L]``) for a frozen layer whose
        valid slots are each row's ``[pad, seen)``: the candidates are ``[start, seen - recent)`` with ``start [B]``
        (:meth:`_candidate_start`), the end from the device-side length (CUDA-graph safe)."""
        hi = (layer.seen_dev - self.sparse_config.num_recent_tokens).expand(logits.shape[0])
        return range_softmax_max(logits, start, hi)

    def _candidate_start(self, layer) -> torch.Tensor | None:
        """``[B]`` (device) each row's first candidate slot, ``pad + num_sink_tokens``, when the layer's valid slots
        are each row's ``[pad, seen)``; ``None`` otherwise (holes in the mask: the torch scores then). Checked once
        per slot buffer (one host read, eagerly; a step being captured without it takes the torch scores)."""
        memo = getattr(self, "_starts", None)
        if memo is None:
            memo = self._starts = {}
        key = (layer._pos.data_ptr(), tuple(layer._pos.shape))
        if memo.get(id(layer), (None,))[0] == key:
            return memo[id(layer)][1]
        if self.capturing:
            return None
        valid = layer._pos[:, 0, :layer.seen] >= 0                       # [B, seen]
        first = valid.int().argmax(-1)
        ranged = bool(((valid.sum(-1) == layer.seen - first) & valid.any(-1)).all())
        start = (first + self.clustering.num_sink).int() if ranged else None
        memo[id(layer)] = (key, start)
        return start

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        i = module.layer_idx
        raw_k = self.raw_keys.pop(i, None)
        if self.method.is_full(i):
            if query.shape[2] > 1 and self.method.is_observer(i):
                self.obs_scores = None
            return super().attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        layer = self.layers[i]
        self._modules[i] = module          # for the flush a replayed step leaves to maintain_layer
        B, H, q_len, D = query.shape
        # Pre-RoPE keys are recovered by inverse RoPE at flush time, except behind a k_norm (Qwen3), which
        # cannot be inverted: there the k_proj output is kept for the raw buffer.
        keep_pre_norm = getattr(module, "k_norm", None) is not None
        if keep_pre_norm and raw_k is None:
            raise RuntimeError("deltakv needs the pre-norm keys; call sparse_hf.prepare_model(model) first")
        # Follow the model's device; checked until the first compression and at each prefill, not every step.
        if (q_len > 1 or layer.state is None) and self.projections.device != query.device:
            self.projections.to(query.device)
        pos = kwargs.get("position_ids")
        pos = pos.expand(B, q_len) if pos is not None else torch.arange(layer.seen - q_len, layer.seen,
                                                                       device=query.device).expand(B, q_len)
        layer.append_raw_k(raw_k.reshape(B, q_len, -1) if keep_pre_norm else None, pos)
        static = self.static_decode and q_len == 1 and layer.frozen
        if static and not self.capturing:
            layer.set_scratch(self._scratch_width(layer, layer.seen))
        out = self._decode_static(module, layer, query, scaling) if static else None
        layer.static_ok = out is not None
        if out is None:
            if attention_mask is not None and not layer.compacted:
                layer.drop_padding(attention_mask)
            out = self._attend_layer(module, layer, query, attention_mask, scaling, q_len)
        if self.prompt_complete(layer) and not self.capturing:
            self._flush(module, layer, attention_mask)
            if not layer.frozen:
                layer.freeze()
        return out, None

    # -- static decode (CUDA-graph safe) ----------------------------------------------------------------------------
    def _decode_static(self, module, layer, query, scaling):
        """A one-token decode step with static shapes and no host sync: the filter layer's top compressed tokens are
        rebuilt (fused kernel) into the layer's scratch slots, then one dense sparse-decode pass reads the raw and
        scratch slots in place. ``None`` when this step cannot be static (no filter scores to pick by)."""
        state = layer.state
        if layer.reads_compressed and layer.scratch != self._scratch_width(layer, layer.seen):
            return None                   # scratch slots not sized for this length: never drop tokens silently
        if layer.reads_compressed and layer.scratch:
            if self.obs_scores is None:
                return None
            if not self.capturing:
                layer.reserve_work()
            k_w, v_w, cols_w = layer.work_views()          # raw slots, then the rebuilt tokens (shared buffer)
            cap = layer.capacity
            rope = module.__dict__["_sparse_hf_rotary"]
            pick, cols, cos_sin = self._static_pick(layer, rope, v_w[:, :, cap:], module.layer_idx)
            deltakv_stage_raw(layer._k, layer._v, layer._pos, cols, k_w, v_w, cols_w)   # raw slots, pick columns
            latents = self._prefetch.take(module.layer_idx, pick) if self._prefetch is not None else None
            rebuild_kv(state, pick, self.projections, module.layer_idx, k_w.shape[1], k_w.shape[-1], rope,
                       getattr(module, "k_norm", None), out=(k_w[:, :, cap:], v_w[:, :, cap:]), cos_sin=cos_sin,
                       latents=latents, fused=self.sparse_config.fused_rebuild)
            return sparse_decode_attention(query[:, :, 0], k_w, v_w, cols_w, scale=scaling, dense=True).unsqueeze(1)
        return sparse_decode_attention(query[:, :, 0], *layer.buffers, scale=scaling,
                                       dense=True).unsqueeze(1)

    def _static_pick(self, layer, rope, like: torch.Tensor, layer_idx: int):
        """``pick [B, scratch]`` offsets, their columns ``[B, scratch]`` (``-1``: not read) and ``rope``'s
        ``(cos, sin)`` at their positions (``like [B, Hkv, scratch, Dv]`` gives the dtype) for a static decode step.
        With ``offload_latents`` a new pick also starts the prefetch of this and the later layers' picked latents.

        Every compressed layer holds the same tokens (the same flushes of the same positions), so the layers of one
        step share one pick and one RoPE table: one top-k over the filter layer's scores per step, not one per layer
        (at 128K that is a top-13K of ~118K scores per row). Shared while the host-side key (scores, length, counts,
        width, rotary, dtype) matches."""
        key = (layer.seen, layer.scratch, tuple(layer.state.counts), layer.state.width, id(rope), like.dtype)
        memo = self._pick_memo
        if memo is not None and memo[0] is self.obs_scores and memo[1] is rope and memo[2] == key:
            return memo[3]
        comp_pos = layer.state.comp_pos
        scores = deltakv_pick_scores(self.obs_scores, comp_pos, layer.col_offset)          # [B, N] offset order
        held = layer.width_dev if layer.state.capacity else None      # a reserved capacity: scores has a tail
        pick, keep = self.method.pick_static(scores, layer.scratch, layer.seen_dev, layer.col_offset[:, 0], held)
        cols, pos = deltakv_pick_columns(pick, keep, comp_pos, layer.col_offset)           # [B, scratch] each
        cos, sin = rope(like.transpose(1, 2), pos)
        self._pick_memo = (self.obs_scores, rope, key, (pick, cols, (cos.contiguous(), sin.contiguous())))
        if self._prefetch is not None and self.prefetch_offloaded:
            self._prefetch.launch(pick, {i: other.state.latent for i, other in enumerate(self.layers)
                                         if i >= layer_idx and self._shares_pick(other, layer)},
                                  self.clustering.step, self.projections.dtype)
        return self._pick_memo[3]

    @staticmethod
    def _shares_pick(other, layer) -> bool:
        """Whether compressed layer ``other`` will reuse ``layer``'s pick at this step (the same compressed tokens
        and scratch width; its length may still be one behind), with latents to gather."""
        s, t = other.state if isinstance(other, DeltaKVLayer) else None, layer.state
        return (s is not None and s.latent is not None and s.latent.codes.shape[1] > 0 and s.counts == t.counts
                and s.width == t.width and other.scratch == layer.scratch)

    def _scratch_width(self, layer, length: int) -> int:
        """Scratch slots a static decode step at logical length ``length`` can use: the current width while it
        still serves (``min(N, top) <= width <= N``), else ``min(N, top)`` at ``num_recent_tokens`` more tokens
        (a flush comes about that often, so fraction budgets re-size rarely). Host ints only."""
        state = layer.state
        if state is not None and state.capacity and self.planned_length is not None:
            # a reserved capacity: one width for every step up to the planned length (past it: growth again)
            recent = self.sparse_config.num_recent_tokens
            horizon = self.planned_length if length <= self.planned_length else length + recent
            return min(state.capacity, self.method.top_count(horizon, prefill=False))
        n = state.width if state is not None else 0
        if n == 0:
            return 0
        if min(n, self.method.top_count(length, prefill=False)) <= layer.scratch <= n:
            return layer.scratch
        return min(n, self.method.top_count(length + self.sparse_config.num_recent_tokens, prefill=False))

    def eager_step_reason(self) -> str | None:
        """Why the next one-token decode step must run eagerly (not replay a CUDA graph), or ``None``: a layer's
        scratch width must change at its start, or the last step could not take the static path. Host ints only (no
        sync). A step that flushes a raw buffer replays: its flush runs after it (:meth:`maintain_layer`), and the
        graph is captured again at the next step (new state tensors, see ``DeltaKVLayer.buffer_signature``)."""
        for layer in self.layers:
            if not isinstance(layer, DeltaKVLayer):
                continue
            if not getattr(layer, "static_ok", False):
                return "a DeltaKV layer's last decode step was not static (e.g. no filter-layer scores)"
            if layer.state is None:
                return "the prompt is not compressed yet"
            if self._scratch_width(layer, layer.seen + 1) != layer.scratch:
                return "the DeltaKV scratch slots are re-sized at this step"
        return None

    # -- attention ------------------------------------------------------------------------------------------------
    def _attend_layer(self, module, layer, query, attention_mask, scaling, q_len):
        if not layer.compacted:
            # Nothing compressed yet: slots are the logical columns, so HF's mask and SDPA kernels apply as is
            # (no [q, n] mask of our own, which at a long prompt would not fit in memory).
            return sdpa_attention_forward(module, query, layer.keys, layer.values, attention_mask,
                                          scaling=scaling)[0]
        keys, values, cols = layer.keys, layer.values, layer.positions
        state = layer.state
        if state.width:
            rk, rv, rcols = self._rebuild(module, layer, q_len)
            keys, values = torch.cat([keys, rk.to(keys.dtype)], 2), torch.cat([values, rv.to(values.dtype)], 2)
            cols = torch.cat([cols, rcols], 2)
        if q_len == 1 and kernels_run_fused(query):   # decode on GPU: Triton, not SDPA's per-shape dispatch
            return sparse_decode_attention(query[:, :, 0], keys, values, cols, scale=scaling,
                                           dense=True).unsqueeze(1)
        valid = cols >= 0
        q_cols = torch.arange(layer.seen - q_len, layer.seen, device=query.device).view(1, 1, q_len, 1)
        allowed = (cols.unsqueeze(2) <= q_cols) & valid.unsqueeze(2)
        if attention_mask is not None:   # padding queries of a prefill chunk: keep SDPA away from empty rows
            allowed = allowed | ~query_validity(attention_mask, q_len, layer.seen, query.shape[0],
                                                query.device).view(query.shape[0], 1, q_len, 1)
        return masked_attention(query, keys, values, allowed, scaling)

    def _rebuild(self, module, layer, q_len):
        """The compressed tokens this step reads, rebuilt: ``K [B, Hkv, k, D]``, ``V``, columns ``[B, Hkv, k]``
        (``-1``: none). At decode the filter layer's top tokens of each row; otherwise all of them."""
        pick = None
        if q_len == 1 and self.obs_scores is not None:
            scores = deltakv_pick_scores(self.obs_scores, layer.state.comp_pos, layer.col_offset)
            pick = self.method.pick(scores, layer.state.width, layer.seen)   # scores may have a reserved tail
        if pick is None:
            pick, cols = layer.all_offsets, layer.compressed_columns()
        else:   # an absent offset (a row with fewer tokens) carries column -1; a row's own budget may cut more
            cols = layer.compressed_columns().gather(1, pick)
            over = self._over_budget(layer)
            if over is not None:
                cols = cols.masked_fill(over, -1)
        B, Hkv, _, D = layer.keys.shape
        keys, values, _ = rebuild_kv(layer.state, pick, self.projections, module.layer_idx, Hkv, D,
                                     module.__dict__["_sparse_hf_rotary"], getattr(module, "k_norm", None))
        return keys, values, cols.unsqueeze(1).expand(B, Hkv, cols.shape[1])

    def _over_budget(self, layer):
        """``[B, top]`` bool, ranks past each row's own budget (fraction budgets), or ``None``; computed once per
        decode step and shared by the layers (every layer has the same rows and length)."""
        if self._over_budget_at is None or self._over_budget_at[0] != layer.seen:
            over = self.method.over_row_budget(layer.col_offset[:, 0], layer.seen)
            self._over_budget_at = (layer.seen, over)
        return self._over_budget_at[1]
