"""DeltaKV: the learned KV compressor and the cluster-reference math shared by the cache, trainer and engine.

The core (no Transformers): :mod:`~sparse_hf.deltakv.projections` (the compressor as a plain ``nn.Module``),
:mod:`~sparse_hf.deltakv.clustering`, :mod:`~sparse_hf.deltakv.quant`, :mod:`~sparse_hf.deltakv.rope` and
:mod:`~sparse_hf.deltakv.state` (the per-layer compressed state with ``flush``/``rebuild``). The Hub-facing
classes (:class:`DeltaKVCompressor`, its config, the model card, the reference checkpoint format) import
Transformers and load only when first used, so ``import sparse_hf.deltakv`` stays core.
"""

from sparse_hf.deltakv.clustering import (
    center_mask,
    cluster_reconstruct,
    compress,
    nearest_centers,
    reconstruct,
    reference_from_fathers,
)
from sparse_hf.deltakv.projections import PROJECTION_TYPES, DeltaKVProjections, normalize_projection_type

#: Names served lazily from the Hub-facing modules (they import Transformers).
_HUB_NAMES = {"DeltaKVCompressor": "compressor", "DeltaKVCompressorConfig": "compressor",
              "render_model_card": "model_card"}


def __getattr__(name):
    if name in _HUB_NAMES:
        import importlib

        return getattr(importlib.import_module(f"sparse_hf.deltakv.{_HUB_NAMES[name]}"), name)
    raise AttributeError(f"module 'sparse_hf.deltakv' has no attribute {name!r}")


__all__ = [
    "PROJECTION_TYPES",
    "DeltaKVCompressor",
    "DeltaKVCompressorConfig",
    "DeltaKVProjections",
    "center_mask",
    "cluster_reconstruct",
    "compress",
    "nearest_centers",
    "normalize_projection_type",
    "reconstruct",
    "reference_from_fathers",
    "render_model_card",
]
