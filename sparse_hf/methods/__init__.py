"""Registry of sparse methods: adding a method is one file plus one line here."""

from __future__ import annotations

from .base import CompressionMethod, EvictionMethod, SelectionMethod, SparseMethod
from .deltakv import DeltaKV
from .h2o import H2O
from .knorm import KNorm
from .omnikv import OmniKV
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

METHODS: dict[str, type[SparseMethod]] = {
    "streamingllm": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "knorm": KNorm,
    "omnikv": OmniKV,
    "deltakv": DeltaKV,
    "h2o": H2O,
}


__all__ = ["METHODS", "get_method", "SparseMethod", "EvictionMethod", "SelectionMethod", "CompressionMethod"]


def get_method(name: str) -> type[SparseMethod]:
    """The method class registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown sparse-hf method {name!r}; valid methods are: {', '.join(sorted(METHODS))}") from None
