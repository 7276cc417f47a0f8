"""Registry of sparse methods: adding a method is one file plus one line here."""

from __future__ import annotations

from .base import SparseMethod
from .deltakv import DeltaKV
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
}


def get_method(name: str) -> type[SparseMethod]:
    """The method class registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown sparse-hf method {name!r}; valid methods are: {', '.join(sorted(METHODS))}") from None
