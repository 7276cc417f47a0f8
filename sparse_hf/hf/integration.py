"""Wiring into Transformers ``generate`` (5.17 up to the latest 5.x).

1. Our method names are added to ``ALL_CACHE_IMPLEMENTATIONS`` so ``GenerationConfig`` validates them.
2. ``GenerationMixin._prepare_cache_for_generation`` is wrapped: for our names it builds our cache from
   ``cache_config`` instead of a ``DynamicCache``; for a user-passed sparse cache it prepares the model.
3. ``GenerationMixin._prefill`` is wrapped to tell the cache where the prompt ends (chunked prefill
   evicts once, after the last chunk) and how many tokens will follow (preallocation).
4. ``prepare_model`` switches the model to the ``sparse_hf`` attention function and installs a forward
   pre-hook on every attention module that hands our cache to that function.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

from transformers.generation import configuration_utils as gen_config_utils
from transformers.generation.utils import GenerationMixin

from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models import check_supported
from .attention import ATTN_IMPLEMENTATION, CACHE_KWARG, register_attention, remember_original_attention
from .cache import SparseCache
from .cuda_graph import GraphDecoder
from .layer import CacheCropError, SlotLayer

CACHE_CLASSES: dict[str, type[SparseCache]] = {}
_CACHE_KEYS = ("cache", "past_key_values")   # 5.24 name first, then 5.17


def register_cache_class(name: str, cls: type[SparseCache]) -> None:
    CACHE_CLASSES[name] = cls
    if name not in gen_config_utils.ALL_CACHE_IMPLEMENTATIONS:
        gen_config_utils.ALL_CACHE_IMPLEMENTATIONS = tuple(gen_config_utils.ALL_CACHE_IMPLEMENTATIONS) + (name,)


def build_cache(name: str, model_config, cache_config=None) -> SparseCache:
    """The cache for method ``name`` (unknown names raise ``ValueError`` listing the valid ones)."""
    if name not in CACHE_CLASSES:
        raise ValueError(f"unknown sparse-hf method {name!r}; valid methods are: {', '.join(sorted(CACHE_CLASSES))}")
    return CACHE_CLASSES[name](model_config, cache_config)   # dict, SparseConfig or method config; checked there


#: The cache of the attention call now running on this thread, per attention module: the pre-hook sets it
#: and ``k_proj``'s hook reads it (a model shared by threads must not pass per-call state through modules).
_CALL = threading.local()


def _attention_pre_hook(module, args, kwargs):
    cache = next((c for c in map(kwargs.get, _CACHE_KEYS) if isinstance(c, SparseCache)), None)
    if cache is None:
        # Not our cache: leave the call alone. Under torch.compile (HF's own StaticCache path on a model that once
        # ran a sparse cache) Dynamo cannot trace the thread-local below, so it must not be touched there.
        if not torch.compiler.is_compiling():
            _CALL.__dict__.get("cache_of", {}).pop(id(module), None)
        return args, kwargs
    calls = _CALL.__dict__.setdefault("cache_of", {})
    calls.pop(id(module), None)
    cache.hooked = True
    kwargs[CACHE_KWARG] = cache
    if getattr(cache, "needs_raw_keys", False):
        calls[id(module)] = weakref.ref(cache)           # weak: a finished call's cache is not kept alive
    return args, kwargs


def _raw_key_hook(attention):
    """Forward hook for ``attention.k_proj``: hands its output (keys before any norm and RoPE) to the cache of
    this thread's current call, for caches that compress raw keys (DeltaKV), keyed by layer; the cache pops
    it, so nothing outlives the layer's call and nothing is stored on the (shared) module."""
    def hook(_module, _args, output):
        if torch.compiler.is_compiling():               # a compiled (non-sparse) call: no cache to feed
            return
        ref = _CALL.__dict__.get("cache_of", {}).get(id(attention))
        cache = ref() if ref is not None else None
        if cache is not None:
            cache.raw_keys[attention.layer_idx] = output
    return hook


def _rotary_embedding(model):
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    return None


_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def graph_blocker(cache, kwargs: dict, args: tuple = ()) -> str | None:
    """Why this ``model.forward(*args, **kwargs)`` call may not replay a CUDA graph, or ``None`` when it may.

    Graphs are the default on CUDA (``cache.cuda_graph`` ``None``; ``False`` opts out) for one-token decode steps
    whose shapes are static: not beams (the cache is reordered every step), not ``output_attentions`` /
    ``output_hidden_states``, not while a prompt is still coming, not layers without a static decode mode, not
    DeltaKV's steps that re-size the scratch slots or follow a non-static one (``eager_step_reason``; the graph is
    captured again after them), not assisted generation (drafts are verified several tokens at a time).
    """
    if not isinstance(cache, SparseCache):
        return "not a sparse-hf cache"
    if cache.cuda_graph is False:
        return "cuda_graph=False"
    if cache.capturing:
        return "a CUDA graph is being captured (the captured step itself runs eagerly)"
    ids = kwargs.get("input_ids")
    if args or ids is None or kwargs.get("inputs_embeds") is not None:
        return "inputs other than input_ids=..."
    if ids.shape[1] != 1:
        return "not a one-token decode step"
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return "output_attentions / output_hidden_states requested"
    if cache.graph_blocked:
        return cache.graph_blocked
    if cache.rollback_needed:
        return "assisted generation"
    if not cache.decoding():
        return "the prompt is not complete"
    if not all(getattr(layer, "frozen", False) for layer in cache.layers):
        return "a layer has no static decode mode"
    eager = getattr(cache, "eager_step_reason", None)   # DeltaKV: scratch re-size steps run eagerly
    reason = eager() if eager is not None else None
    if reason:
        return reason
    decoder = getattr(cache, "graph_decoder", None)
    if decoder is not None and decoder.disabled:
        return "an earlier capture failed"
    if not ids.is_cuda:
        return "not on CUDA"
    return None


def wants_cuda_graph(cache, kwargs: dict, args: tuple = ()) -> bool:
    """Whether this forward replays a captured CUDA graph (see :func:`graph_blocker`); anything else runs eagerly,
    with no error."""
    return graph_blocker(cache, kwargs, args) is None


def _graph_forward(model):
    """``model.forward`` that replays a CUDA graph for the decode steps :func:`wants_cuda_graph` accepts; anything
    else goes to the original forward."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        _, cache = _find_cache(kwargs)
        if wants_cuda_graph(cache, kwargs, args):
            ids = kwargs["input_ids"]
            if getattr(cache, "graph_decoder", None) is None:
                cache.graph_decoder = GraphDecoder(model, cache, forward=original)
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.full_like(ids, cache.get_seq_length())
            logits = cache.graph_decoder.step(ids, pos).clone()
            return CausalLMOutputWithPast(logits=logits[:, None], **{_OUTPUT_CACHE_FIELD: cache})
        return original(*args, **kwargs)

    forward._sparse_hf_wrapped = True
    return forward


def prepare_model(model) -> None:
    """Make ``model`` run sparse-hf caches: check the architecture, select the ``sparse_hf`` attention
    function (plain SDPA for other caches) and hook every attention module. Idempotent."""
    check_supported(model.config)
    register_attention()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        for module in model.modules():   # plain calls keep using this implementation (see attention.py)
            if getattr(module, "config", None) is not None:
                remember_original_attention(module.config)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if not getattr(model.forward, "_sparse_hf_wrapped", False):
        model.forward = _graph_forward(model)
    rotary = _rotary_embedding(model)
    for module in model.modules():
        if hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention"):
            if not getattr(module, "_sparse_hf_hooked", False):
                module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
                if hasattr(module, "k_proj"):
                    module.k_proj.register_forward_hook(_raw_key_hook(module))
                module.__dict__["_sparse_hf_rotary"] = rotary   # a plain attribute, not a submodule
                module._sparse_hf_hooked = True


def _find_cache(model_kwargs):
    for key in _CACHE_KEYS:
        if model_kwargs.get(key) is not None:
            return key, model_kwargs[key]
    return None, None


def _wrap_prepare_cache(original):
    @functools.wraps(original)
    def wrapper(self, generation_config, model_kwargs, *args, **kwargs):
        name = generation_config.cache_implementation
        if name not in CACHE_CLASSES:
            result = original(self, generation_config, model_kwargs, *args, **kwargs)
            _, cache = _find_cache(model_kwargs)
            if isinstance(cache, SparseCache):
                prepare_model(self)
            return result
        _, user_cache = _find_cache(model_kwargs)
        # A cache this method built in an earlier call is continued (e.g. an assistant model's: Transformers 5.17
        # generates it with the main model's cache_implementation and the cache it returned before).
        continuing = isinstance(user_cache, CACHE_CLASSES[name]) and getattr(user_cache, "built_by_generate", False)
        if user_cache is not None and not continuing:
            raise ValueError("pass either cache_implementation or a cache object (past_key_values=...), not both")
        generation_config.cache_implementation = None   # Transformers must not build a cache of its own
        try:
            result = original(self, generation_config, model_kwargs, *args, **kwargs)
        finally:
            generation_config.cache_implementation = name
        if not continuing:
            key, _ = _find_cache(model_kwargs)
            if key is None:
                raise ValueError(f"cache_implementation={name!r} needs use_cache=True")
            model_kwargs[key] = build_cache(name, self.config, generation_config.cache_config)
            model_kwargs[key].built_by_generate = True
        prepare_model(self)
        return result

    wrapper._sparse_hf_wrapped = True
    return wrapper


def _wrap_prefill(original):
    @functools.wraps(original)
    def wrapper(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        _, cache = _find_cache(model_kwargs)
        if isinstance(cache, SparseCache):
            mask = model_kwargs.get("attention_mask")
            cache.prefill_target = max(input_ids.shape[1], mask.shape[1] if mask is not None else 0)
            new_tokens = generation_config.max_new_tokens
            if new_tokens is None and generation_config.max_length:   # max_length only: Transformers made it final
                new_tokens = max(0, generation_config.max_length - input_ids.shape[1])
            cache.announce_new_tokens(new_tokens, cache.prefill_target)
            cache.graph_blocked = "beam search" if (generation_config.num_beams or 1) > 1 else None
        return original(self, input_ids, generation_config, model_kwargs, *args, **kwargs)

    wrapper._sparse_hf_wrapped = True
    return wrapper


def _wrap_assisted_decoding(original):
    """Assisted and prompt-lookup generation: the prompt ends at the input length (the first forward appends draft
    tokens to it), and rejected drafts are cropped, so an evicting cache must say so instead of going wrong."""
    @functools.wraps(original)
    def wrapper(self, input_ids, *args, **model_kwargs):
        _, cache = _find_cache(model_kwargs)
        if not isinstance(cache, SparseCache):
            return original(self, input_ids, *args, **model_kwargs)
        if not all(type(layer) is SlotLayer for layer in cache.layers):   # e.g. DeltaKV's compressed layers
            raise CacheCropError(f"{cache.method_name} cannot roll back rejected draft tokens, which assisted and "
                                 "prompt-lookup generation need: generate without assistant_model / "
                                 "prompt_lookup_num_tokens, or use another method")
        mask = model_kwargs.get("attention_mask")
        cache.prefill_target = max(input_ids.shape[1], mask.shape[1] if mask is not None else 0)
        cache.rollback_needed = True
        try:
            return original(self, input_ids, *args, **model_kwargs)
        finally:
            cache.rollback_needed = False

    wrapper._sparse_hf_wrapped = True
    return wrapper


def install() -> None:
    """Patch ``generate`` (idempotent). Called on ``import sparse_hf``."""
    register_attention()
    if not getattr(GenerationMixin._prepare_cache_for_generation, "_sparse_hf_wrapped", False):
        GenerationMixin._prepare_cache_for_generation = _wrap_prepare_cache(GenerationMixin._prepare_cache_for_generation)
    if not getattr(GenerationMixin._prefill, "_sparse_hf_wrapped", False):
        GenerationMixin._prefill = _wrap_prefill(GenerationMixin._prefill)
    assisted = getattr(GenerationMixin, "_assisted_decoding", None)
    if assisted is not None and not getattr(assisted, "_sparse_hf_wrapped", False):
        GenerationMixin._assisted_decoding = _wrap_assisted_decoding(assisted)
