"""``Cache`` subclasses for the HF path.

``SparseCache`` holds one :class:`SlotLayer` per decoder layer and a method object (from
``sparse_hf.methods``) that decides what to keep. ``EvictionCache`` serves the eviction family
(StreamingLLM, SnapKV, PyramidKV): full attention during the prompt, then each layer keeps the slots
its method selects, right after that layer's attention, so only one layer at a time is ever full size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..config import SparseConfig
from ..methods import get_method
from ..models import check_supported
from .attention import attention_with_lse, masked_attention, query_validity
from .layer import CacheCropError, SlotLayer
from .scored_layer import ScoredSlotLayer

from sparse_hf.kernels import sparse_decode_attention
from sparse_hf.kernels.dispatch import kernels_run_fused


def dense_gpu_decode(layer: SlotLayer, query: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """Decode on GPU over a frozen layer's live slots: one Triton pass reading K/V in place (static shapes, no mask,
    no SDPA dispatch, no host sync: CUDA-graph safe). ``query [B, H, 1, D]`` -> ``[B, 1, H, D]``; ``None`` when
    this path does not apply (CPU, no Triton, layer not in decode mode)."""
    if not (layer.frozen and kernels_run_fused(query)):
        return None
    return sparse_decode_attention(query[:, :, 0], *layer.buffers, scale=scaling,
                                   dense=True).unsqueeze(1)


class SparseCache(Cache):
    """Base of every sparse-hf cache.

    Args:
        config: the model's ``PretrainedConfig`` (Llama, Qwen2 or Qwen3 family).
        sparse_config: the method's config object, a knob dict or a :class:`SparseConfig`; or pass the knobs as
            keyword arguments. Runtime options (``cuda_graph``, ``compressor``, ``deltakv_path``) go to
            ``self.runtime``; the method's knobs to ``self.sparse_config`` (a frozen method config).
    """

    method_name: ClassVar[str] = ""
    layer_class: ClassVar[type] = SlotLayer

    def __init__(self, config, sparse_config: SparseConfig | None = None, **knobs):
        if hasattr(config, "config") and callable(getattr(config, "forward", None)):
            raise ValueError(f"{type(self).__name__} takes the model's config, not the model: "
                             f"{type(self).__name__}(model.config, ...)")
        check_supported(config)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        method_class = get_method(self.method_name)
        self.sparse_config, self.runtime = method_class.build_config(sparse_config, **knobs)
        self.num_layers = text_config.num_hidden_layers
        self.model_config = text_config
        self.method = self.serving_method(method_class(self.sparse_config, self.num_layers), sparse_config, knobs)
        self.sparse_config = self.method.config
        super().__init__(layers=[self.make_layer(i) for i in range(self.num_layers)])
        self.prefill_target: int | None = None   # logical length at which the prompt is complete
        # CUDA-graph decode: None = automatic (on CUDA where safe), False = never; see integration.wants_cuda_graph.
        # None: automatic (on CUDA where safe); True: asked for (also where graphs are opt-in, DeltaKV); False: never
        self.cuda_graph: bool | None = self.runtime.cuda_graph
        self.graph_blocked: str | None = None    # why this generate call may not use CUDA graphs (e.g. beams)
        self.rollback_needed = False             # assisted generation: crop must work, so eviction is an error
        self.capturing = False                   # True while a CUDA graph records a decode step
        self.hooked = False                      # set by the attention pre-hook; checked in update

    def serving_method(self, method, sparse_config, knobs: dict):
        """The method this cache serves with, decided before its layers are made (``sparse_config`` and ``knobs``
        as the caller passed them). The method as configured; DeltaKV's cache applies its compressor's defaults."""
        return method

    def make_layer(self, layer_idx: int):
        if getattr(self.method, "accumulates_attention", False):
            return ScoredSlotLayer()
        return self.layer_class()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx >= self.num_layers:
            raise ValueError(f"{type(self).__name__} was built for a {self.num_layers}-layer model but got layer "
                             f"{layer_idx}: build the cache from this model's config")
        if not self.hooked:
            raise RuntimeError(
                f"{type(self).__name__} needs the sparse-hf attention function. Use model.generate(...), which sets "
                "it up, or call sparse_hf.prepare_model(model) once before calling the model directly.")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    #: Slots reserved up front for generated tokens: an eighth of the prompt, clamped to this range (and never more
    #: than ``max_new_tokens``). More come by geometric growth when needed, so a huge ``max_new_tokens`` with an
    #: early stop costs no memory.
    FIRST_RESERVE_RANGE: ClassVar[tuple[int, int]] = (64, 1024)

    def set_reserve(self, tokens: int) -> None:
        """Preallocate room for exactly ``tokens`` more slots after the prompt (layers with a bounded decode
        window, StreamingLLM's, never take more than that window)."""
        bound = getattr(self.method, "decode_slot_limit", None)
        for layer in self.layers:
            layer.reserve = max(0, int(tokens))
            layer.max_slots = bound

    def announce_new_tokens(self, max_new_tokens: int | None, prompt_length: int) -> None:
        """What ``generate`` calls before the prompt: reserve room for a bounded part of the ``max_new_tokens`` to
        come (see ``FIRST_RESERVE_RANGE``), since generation may stop long before."""
        low, high = self.FIRST_RESERVE_RANGE
        first = min(max(prompt_length // 8, low), high)
        self.set_reserve(min(max(0, int(max_new_tokens or 0)), first))

    def in_prefill(self, layer, q_len: int) -> bool:
        """Whether this forward of ``q_len`` tokens (already appended to ``layer``) is part of a prompt.

        Told by what ``generate`` does, not by the query length: its ``_prefill`` sets ``prefill_target``, and a
        layer is in prefill until it holds that many tokens, so a one-token last prefill chunk is still prefill.
        Forwards of several tokens after the prompt (assisted generation's draft verification) are decode steps.
        Without ``generate`` (direct calls), a forward of several tokens, or the very first token, is prefill.
        """
        if self.prefill_target is not None:
            return layer.seen - q_len < self.prefill_target
        return q_len > 1 or layer.seen == q_len

    def prompt_complete(self, layer) -> bool:
        return self.prefill_target is None or layer.seen >= self.prefill_target

    def decoding(self) -> bool:
        """True when every layer holds the whole prompt (the next one-token forward is a decode step)."""
        target = self.prefill_target or 1
        return all(layer.seen >= target for layer in self.layers)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # Every layer reports the full logical length, so one mask serves layers of any physical size.
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        raise NotImplementedError

    def maintain_layer(self, layer_idx: int) -> None:
        """Work a decode step does outside the attention math (e.g. eviction); run eagerly between CUDA-graph
        replays."""

    def advance(self, steps: int = 1) -> None:
        """Advance the host-side counters after ``steps`` replayed decode steps."""
        for layer in self.layers:
            layer.advance(steps)

    def __repr__(self):
        return f"{type(self).__name__}(method={self.method_name!r}, layers={self.num_layers})"


def _plain_attention(module, dropout: float, kwargs: dict) -> bool:
    """An attention call that SDPA with a causal mask computes exactly (no dropout, soft-capping, position bias or
    non-causal module), so a fused kernel that also returns the log-sum-exp may stand in for it."""
    return (not dropout and all(kwargs.get(k) is None for k in ("softcap", "position_bias"))
            and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False)


class EvictionCache(SparseCache):
    """Physical eviction: StreamingLLM, SnapKV, PyramidKV."""

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer = self.layers[module.layer_idx]
        q_len = query.shape[2]
        prefill = self.in_prefill(layer, q_len)
        scored = self.method.accumulates_attention
        out = dense_gpu_decode(layer, query, scaling) if not prefill and q_len == 1 else None
        lse = None                          # H2O's prompt: each query's log-sum-exp from its attention, if given
        if out is None and not layer.compacted and scored and prefill and q_len > 1 and _plain_attention(
                module, dropout, kwargs):
            fused = attention_with_lse(query, key, value, attention_mask, scaling)
            if fused is not None:
                out, lse = fused
        if out is None and not layer.compacted:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
        elif out is None:
            out = masked_attention(query, key, value, layer.slot_mask(attention_mask, q_len), scaling)

        window = self.method.query_window
        if prefill and window:
            qv = query_validity(attention_mask, q_len, layer.seen, query.shape[0], query.device)
            layer.remember_queries(query, qv, window)
        if scored and not prefill and q_len == 1 and layer.frozen:
            # H2O's decode step: static shapes over the whole buffer, so a CUDA graph captures it (eager: the same)
            layer.accumulate_decode(self.method, query, scaling)
        elif scored:                        # H2O: every query's attention mass adds to the slots' scores
            layer.accumulate(self.method, query, self._key_validity(layer, attention_mask, q_len),
                             query_validity(attention_mask, q_len, layer.seen, query.shape[0], query.device)
                             if q_len > 1 else None, scaling, lse=lse)
        if prefill and self.prompt_complete(layer):
            # Slot validity as seen by the last query: drops padding columns.
            valid = self._key_validity(layer, attention_mask, q_len)
            if scored:
                plan = self.method.prefill_keep_scored(module.layer_idx, valid, layer.scores,
                                                      positions=layer.positions)
                layer.row_budget = self.method.row_budget(valid)
            else:
                plan = self.method.prefill_keep(module.layer_idx, layer.keys, valid, layer.query_window,
                                                layer.query_valid, scaling)
            layer.query_window = layer.query_valid = None
            layer.drop_invalid(valid)
            if plan is not None:
                self._check_no_rollback()
                layer.keep(*plan)
            layer.freeze()
            if scored:
                self._note_steady(layer)
        elif not prefill and not self.capturing:
            self.maintain_layer(module.layer_idx)
        return out, None

    @staticmethod
    def _key_validity(layer, attention_mask, q_len) -> torch.Tensor:
        """``[B, Hkv, n]`` bool: slots the last query may see (padding columns dropped)."""
        if q_len == 1 and layer.frozen:
            return layer.valid()
        return layer.slot_mask(attention_mask[:, :, -1:] if attention_mask is not None else None, 1)[:, :, 0]

    def maintain_layer(self, layer_idx: int) -> None:
        """Decode-time eviction of one layer (StreamingLLM's rolling window, H2O's heavy hitters).

        H2O in the steady state (``layer.steady``: every row at exactly its budget after the last eviction, a host
        flag) drops one token per row and head with ``method.decode_evict_one_in_order`` and ``layer.drop_one``:
        static shapes, no host sync. The flag is set where a step syncs anyway: at the end of a prompt (whose
        eviction leaves every row over its budget exactly at it) and after a general eviction. Anything else (rows
        still growing to their budget, e.g. a short prompt in the batch; multi-token steps) takes the general
        ``decode_keep``, which syncs; both keep the same tokens in the same slots."""
        if not self.method.evicts_during_decode:
            return                                  # the method never evicts during decode: no per-step work
        layer = self.layers[layer_idx]
        if getattr(layer, "steady", False):
            # Steady state (H2O; host flag, see ScoredSlotLayer.steady): every row holds budget + 1 after this
            # step's token, so each row and head drops one, found by the method's one-argmin rule: no host sync.
            self._check_no_rollback()
            layer.drop_one(*self.method.decode_evict_one_in_order(layer.scores, layer.valid(), layer.positions))
            layer.steady = True
            return
        if self.method.accumulates_attention:
            plan = self.method.decode_keep(layer_idx, layer.valid(), layer.scores, layer.row_budget,
                                           positions=layer.positions)
        else:
            plan = self.method.decode_keep(layer_idx, layer.valid())
        if plan is not None:
            self._check_no_rollback()
            layer.keep(*plan)
            if self.method.accumulates_attention:
                self._note_steady(layer)

    def _note_steady(self, layer) -> None:
        """After an eviction or a prompt (steps that sync anyway): set ``layer.steady`` when every row holds exactly
        its budget, so the following decode steps evict with the one-token rule (see :meth:`maintain_layer`)."""
        if hasattr(self.method, "decode_evict_one_in_order") and layer.frozen and layer.row_budget is not None:
            layer.steady = bool((layer.valid().sum(-1) == layer.row_budget.view(-1, 1)).all())

    def _check_no_rollback(self) -> None:
        if self.rollback_needed:
            raise CacheCropError(
                f"{self.method_name} evicts tokens, and assisted or prompt-lookup generation needs a cache that can "
                "roll back rejected draft tokens. Use a budget that covers the whole sequence, method='omnikv' "
                "(which never evicts), or generate without assistant_model / prompt_lookup_num_tokens.")
