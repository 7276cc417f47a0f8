"""``EngineConfig``: the engine's own knobs (batching, memory, graphs), validated once.

The sparse method's knobs are not here: they stay a :class:`sparse_hf.config.SparseConfig`, built from the same
names, defaults and validation as ``cache_config`` on the HF path (:func:`build_method`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods import get_method

#: Methods the engine runs today (DeltaKV: a compressed store beside the raw pool, see ``deltakv_store``).
ENGINE_METHODS = ("streamingllm", "snapkv", "pyramidkv", "knorm", "omnikv", "h2o", "deltakv")

#: How token selections are made under tensor parallelism (``tp_selection``): ``"exact"`` combines the ranks'
#: per-token scores (an all-reduce) before every selection that spans heads on several ranks, so TP=N selects what
#: TP=1 does; ``"per_rank"`` lets each rank select from its own heads (the reference engine's behaviour: one
#: collective less per selection, output not equal to TP=1). Per-KV-head selections are exact either way.
TP_SELECTIONS = ("exact", "per_rank")

#: How DeltaKV prompts prefill (``deltakv_prefill``): ``"chunked"`` runs every layer on each chunk (the prompt stays
#: raw in every layer until it ends, so the compressed layers' group must hold it whole); ``"layerwise"`` runs each
#: prompt as a step of its own, layer by layer over all its chunks, compressing each compressed layer as soon as it is
#: done (only sinks + buffer stay raw there: longer prompts fit); ``"auto"`` runs prompts the compressed group has no
#: room for (longer than ``deltakv_store.AUTO_CHUNKED_TOKENS``, or than the pool allows) layer-wise, the rest chunked.
DELTAKV_PREFILLS = ("auto", "chunked", "layerwise")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an int >= 1")


@dataclass
class EngineConfig:
    """Engine knobs.

    Attributes:
        max_model_len: longest sequence (prompt + output) a request may reach; ``None``: the model's
            ``max_position_embeddings``.
        gpu_memory_utilization: fraction of the GPU's memory the engine may use (weights + activations + KV pool).
        max_num_seqs: rows decoded together (the pool's slot tables have this many rows).
        max_num_batched_tokens: prompt tokens one prefill step may process (all chunks together).
        chunk_prefill_size: prompt tokens of one request per prefill step.
        enforce_eager: ``True`` turns CUDA-graph decode off.
        num_kv_slots: pool size in tokens per layer; ``None`` sizes it from ``gpu_memory_utilization`` (CUDA) or
            from ``max_num_seqs * max_model_len`` capped at 65,536 (CPU). DeltaKV splits the memory of that many
            full slots between its filter layers and its compressed layers (``deltakv_store.split_slots``).
        sparse_method: ``None`` (full attention) or one of :data:`ENGINE_METHODS`.
        tp_selection: one of :data:`TP_SELECTIONS` (only matters with ``tensor_parallel_size > 1``).
        mixed_steps: while some requests decode and others wait to prefill, one step carries the decode rows (one
            token each) together with prompt chunks, up to ``max_num_batched_tokens`` tokens in all
            (Sarathi-style), so decode rows do not stall behind long prefills; ``False`` alternates prefill steps
            and decode steps. A step of decode rows only still replays a CUDA graph either way.
        deltakv_prefill: one of :data:`DELTAKV_PREFILLS` (DeltaKV only). A layer-wise prompt is a step of its own:
            the decode rows wait during it (as in the reference engine's batch-1 long-prompt path).
        layerwise_hidden_on_host: a layer-wise prefill keeps the hidden states between layers (``[n, hidden]``) in
            pinned host memory instead of on the device (streamed chunk by chunk; less device memory per token).
    """

    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    chunk_prefill_size: int = 2048
    enforce_eager: bool = False
    num_kv_slots: int | None = None
    sparse_method: str | None = None
    tp_selection: str = "exact"
    mixed_steps: bool = True
    deltakv_prefill: str = "auto"
    layerwise_hidden_on_host: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "chunk_prefill_size"):
            _positive_int(name, getattr(self, name))
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.num_kv_slots is not None:
            _positive_int("num_kv_slots", self.num_kv_slots)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization!r}: expected a fraction in (0, 1]")
        if not isinstance(self.mixed_steps, bool):
            raise ValueError(f"mixed_steps={self.mixed_steps!r}: expected True or False")
        if self.deltakv_prefill not in DELTAKV_PREFILLS:
            raise ValueError(f"deltakv_prefill={self.deltakv_prefill!r}: expected 'auto' (long prompts layer-wise, "
                             "the rest chunked), 'chunked' or 'layerwise'")
        if not isinstance(self.layerwise_hidden_on_host, bool):
            raise ValueError(f"layerwise_hidden_on_host={self.layerwise_hidden_on_host!r}: expected True or False")
        if self.sparse_method != "deltakv" and (self.deltakv_prefill == "layerwise" or self.layerwise_hidden_on_host):
            raise ValueError("deltakv_prefill='layerwise' and layerwise_hidden_on_host=True apply to "
                             f"sparse_method='deltakv' only (got sparse_method={self.sparse_method!r}); drop them")
        if self.chunk_prefill_size > self.max_num_batched_tokens:
            raise ValueError(f"chunk_prefill_size={self.chunk_prefill_size} exceeds max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}; lower the first or raise the second")
        if self.tp_selection not in TP_SELECTIONS:
            raise ValueError(f"tp_selection={self.tp_selection!r}: expected 'exact' (TP=N selects the tokens TP=1 "
                             "selects; scores are all-reduced across ranks) or 'per_rank' (each rank selects from its "
                             "own heads, as the reference engine does: cheaper, output differs from TP=1)")
        if self.sparse_method is not None:
            get_method(self.sparse_method)              # unknown name: ValueError listing the valid ones
            if self.sparse_method not in ENGINE_METHODS:
                raise NotImplementedError(
                    f"sparse_method={self.sparse_method!r} is not yet supported in the engine (supported: "
                    f"{', '.join(ENGINE_METHODS)}); use the HF path: model.generate(cache_implementation="
                    f"{self.sparse_method!r}, ...)")


def build_method(name: str | None, knobs: dict, num_layers: int):
    """The core method object for ``name`` with ``knobs`` (the HF path's ``cache_config`` names), or ``None``.

    Raises ``ValueError`` for knobs without a method, unknown knobs, or knobs the method rejects."""
    if name is None:
        if knobs:
            raise ValueError(f"sparse knobs {sorted(knobs)} were given without sparse_method; pass sparse_method="
                             f"one of {', '.join(ENGINE_METHODS)} or drop them")
        return None
    method_class = get_method(name)
    config, runtime = method_class.build_config(**knobs)
    if runtime.cuda_graph is not None:
        raise ValueError("cuda_graph is an HF-path knob; the engine captures decode graphs unless enforce_eager=True")
    if name == "deltakv":
        from .deltakv_store import require_compressor
        require_compressor(runtime)             # before any rank starts
    if getattr(config, "chunk_prefill_accel_omnikv", False):
        raise NotImplementedError("chunk_prefill_accel_omnikv is not yet supported in the engine; leave it False")
    return method_class(config, num_layers)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is not supported), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
