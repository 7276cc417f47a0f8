"""Decode-time attention kernels for sparse KV caches (Triton, with pure-torch fallbacks).

Installed as ``sparse_hf.kernels`` (import it under that name). Triton is optional: without it, or for CPU
tensors when the kernels were not built under the Triton interpreter (``TRITON_INTERPRET=1`` set before import),
``backend="auto"`` runs the torch reference in :mod:`sparse_hf.kernels.reference`.

- :func:`sparse_decode_attention` -- one query token attends to a per-KV-head list of cache positions, reading
  K/V in place (split-K + log-sum-exp merge, GQA groups share each K/V load).
- :func:`decode_attention_with_scores` -- full decode attention that also returns the per-token logits
  (per head, max per KV group, or max over all heads) for token selection.
- :func:`snapkv_prefill_scores` -- SnapKV window scores ``[B, Hkv, L]`` without a ``[B, H, W, L]`` tensor.
- :func:`deltakv_rebuild_kv` -- DeltaKV's picked compressed tokens rebuilt (dequantise, ``up``, fathers' mean,
  k_norm, RoPE) into scratch K/V slots that :func:`sparse_decode_attention` reads; for a linear ``up`` in one launch
  (:mod:`sparse_hf.kernels.deltakv_fused`). :func:`deltakv_stage_raw` puts a layer's raw slots and the picks' columns
  into the shared work buffer (one launch), and :mod:`sparse_hf.kernels.deltakv_pick` gathers the observer's scores
  and the picks' columns from the compressed positions.
- :func:`attention_mass` -- H2O's accumulated attention mass ``[B, Hkv, L]`` of a block of queries (causal by
  logical position, GQA, optional slot table) in two passes over the keys, without ``[B, H, q, L]`` logits, or in
  one given each query's log-sum-exp from its attention (``lse=``; :mod:`sparse_hf.kernels.attention_lse` gets it
  from the fused SDPA ops, ``paged_prefill_attention(..., lse=)`` from the paged kernel);
  :func:`decode_attention_mass` the same for one decode query from its ``[B, H, L]`` logits.
- :func:`~sparse_hf.kernels.evict_one.evict_one_slots` -- H2O's steady-state decode eviction (one token out per
  layer, row and KV head; the newest token moves into its slot) for every layer in one launch.
- :func:`paged_prefill_attention` -- packed prompt chunks attend causally (lower-right) to their rows' slots in a
  ``[S, Hkv, D]`` pool through a slot table, read in place (varlen flash attention; the engine's prefill).
- :func:`append_kv` -- one decode token per row at a device-side slot counter (the HF path).
- :func:`store_kv_slots` -- ``[T, Hkv, D]`` tokens into a ``[num_slots, Hkv, D]`` pool through a per-token
  ``slot_mapping`` (``-1`` skips) with their logical positions (the engine path).
- :func:`rms_norm` (with the residual add), :func:`rope_qkv` (RoPE on a fused QKV, Qwen3's q/k norm, the K/V store
  into the slot pool) and :func:`silu_mul` -- the engine's decoder-layer ops, one launch each.

The Triton-or-torch choice of every entry point is made in :func:`sparse_hf.kernels.dispatch.use_triton`.
"""

import sys as _sys


def _hand_over_to_hub_package() -> None:
    """Imported as top-level ``kernels``, not ``sparse_hf.kernels``: a checkout's root is on ``sys.path`` (``python -m``
    or pytest started there) and this folder shadows the Hugging Face Hub package of that name, which transformers
    >= 5.25 depends on and imports (``integrations.hub_kernels``: ``from kernels import ...``). Put the Hub package
    in ``sys.modules`` in this module's place (the import system returns what ``sys.modules`` holds once the module
    has run). Without it, an empty stand-in with no ``__file__`` and no version: what transformers' availability check
    (5.24: it imports a package that has no metadata) takes for a namespace package shadowing nothing real."""
    import importlib
    import os
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _sys.modules.pop("kernels", None)
    saved = list(_sys.path)
    _sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    try:
        hub = importlib.import_module("kernels")
    except ImportError:
        hub = types.ModuleType("kernels", "Stand-in: sparse-hf's kernels folder is sparse_hf.kernels, and the Hub "
                                          "package 'kernels' is not installed.")
        hub.__file__, hub.__path__ = None, []
    finally:
        _sys.path[:] = saved
    _sys.modules["kernels"] = hub


if __name__ == "kernels":
    _hand_over_to_hub_package()
else:
    from .append import append_kv, store_kv_slots
    from .attention_mass import attention_mass, attention_mass_ref, attention_probabilities
    from .decode_mass import decode_attention_mass, decode_attention_mass_ref
    from .decode_scores import decode_attention_with_scores, snapkv_prefill_scores
    from .deltakv_rebuild import deltakv_gather_latents, deltakv_rebuild_kv, deltakv_stage_raw, deltakv_writeback
    from .dispatch import HAS_TRITON, kernels_run_fused
    from .fused_layer import rms_norm, rope_qkv, silu_mul
    from .paged_prefill import paged_prefill_attention
    from .reference import (append_kv_ref, decode_attention_with_scores_ref, deltakv_gather_latents_ref,
                            deltakv_stage_raw_ref, deltakv_writeback_ref, paged_prefill_attention_ref, rms_norm_ref, rope_qkv_ref, silu_mul_ref,
                            snapkv_prefill_scores_ref,
                            sparse_decode_attention_ref, store_kv_slots_ref)
    from .sparse_decode import sparse_decode_attention

__all__ = [
    "HAS_TRITON",
    "append_kv",
    "append_kv_ref",
    "attention_mass",
    "attention_mass_ref",
    "attention_probabilities",
    "kernels_run_fused",
    "deltakv_gather_latents",
    "deltakv_gather_latents_ref",
    "deltakv_rebuild_kv",
    "deltakv_stage_raw",
    "deltakv_stage_raw_ref",
    "deltakv_writeback",
    "deltakv_writeback_ref",
    "store_kv_slots",
    "store_kv_slots_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "decode_attention_mass",
    "decode_attention_mass_ref",
    "decode_attention_with_scores",
    "decode_attention_with_scores_ref",
    "snapkv_prefill_scores",
    "snapkv_prefill_scores_ref",
    "sparse_decode_attention",
    "sparse_decode_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_qkv",
    "rope_qkv_ref",
    "silu_mul",
    "silu_mul_ref",
]
