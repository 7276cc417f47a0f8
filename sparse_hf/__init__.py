"""sparse-hf: sparse and compressed KV caches for Hugging Face Transformers.

``import sparse_hf`` registers the methods with ``generate``::

    model.generate(**batch, cache_implementation="snapkv", cache_config={"num_top_tokens": 0.2})
"""

__version__ = "0.1.0"

from .config import SparseConfig
from .hf import CACHE_CLASSES, GraphDecoder, SparseCache, build_cache, install, prepare_model
from .methods import METHODS, get_method
from .usage import KVUsage, kv_usage

install()

globals().update({cls.__name__: cls for cls in CACHE_CLASSES.values()})

__all__ = ["SparseConfig", "SparseCache", "GraphDecoder", "build_cache", "prepare_model", "kv_usage", "KVUsage", "METHODS",
           "get_method", *[cls.__name__ for cls in CACHE_CLASSES.values()]]

from .engine import LLM, SamplingParams  # noqa: E402  (the serving engine)
__all__ += ["LLM", "SamplingParams"]
