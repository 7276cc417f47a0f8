"""The Hugging Face Transformers path: caches, attention function and ``generate`` wiring."""

from __future__ import annotations

from ..methods import METHODS
from .cache import EvictionCache, SparseCache
from .cuda_graph import GraphDecoder
from .deltakv_cache import CompressedCache
from .selection_cache import SelectionCache
from .integration import CACHE_CLASSES, build_cache, install, prepare_model, register_cache_class
from .layer import CacheCropError

#: Cache base class per method family; a method's cache class is derived from its family's.
FAMILY_CACHES: dict[str, type[SparseCache]] = {"evict": EvictionCache, "mask": SelectionCache,
                                                 "compress": CompressedCache}


def _make_cache_class(name: str, method_cls) -> type[SparseCache]:
    base = FAMILY_CACHES[method_cls.family]
    doc = (f"HF ``Cache`` for the {name!r} method: ``{method_cls.__name__}Cache(model.config, **knobs)``.\n\n"
           f"{(method_cls.__doc__ or '').strip()}")
    return type(f"{method_cls.__name__}Cache", (base,), {"method_name": name, "__doc__": doc, "__module__": __name__})


for _name, _method in METHODS.items():
    if _method.family in FAMILY_CACHES:
        register_cache_class(_name, _make_cache_class(_name, _method))

__all__ = ["CACHE_CLASSES", "CacheCropError", "GraphDecoder", "SparseCache", "build_cache", "install", "prepare_model"]
