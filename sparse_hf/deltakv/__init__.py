"""DeltaKV: the learned KV compressor and the cluster-reference math shared by the cache, trainer and engine."""

from sparse_hf.deltakv.clustering import (
    center_mask,
    cluster_reconstruct,
    compress,
    nearest_centers,
    reconstruct,
    reference_from_fathers,
)
from sparse_hf.deltakv.compressor import (
    PROJECTION_TYPES,
    DeltaKVCompressor,
    DeltaKVCompressorConfig,
    normalize_projection_type,
)
from sparse_hf.deltakv.model_card import render_model_card

__all__ = [
    "PROJECTION_TYPES",
    "DeltaKVCompressor",
    "DeltaKVCompressorConfig",
    "center_mask",
    "cluster_reconstruct",
    "compress",
    "nearest_centers",
    "normalize_projection_type",
    "reconstruct",
    "reference_from_fathers",
    "render_model_card",
]
