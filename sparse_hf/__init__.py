"""sparse-hf: sparse and compressed KV caches for Hugging Face Transformers.

``import sparse_hf`` registers the methods with ``generate``::

    model.generate(**batch, cache_implementation="snapkv", cache_config={"num_top_tokens": 0.2})

The package imports lazily: its names (``SnapKVCache``, ``build_cache``, ``kv_usage``, ...) load on first use, and
the registration with ``generate`` runs as soon as ``transformers`` is imported (at once if it already is). So the
core (``sparse_hf.methods``, ``sparse_hf.kernels``) and the ``sparse-hf`` command line start without loading
transformers (``sparse-hf --help`` loads neither torch nor transformers).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_EXPORTS = {
    "SparseConfig": "sparse_hf.config",
    "SparseCache": "sparse_hf.hf",
    "CacheCropError": "sparse_hf.hf",
    "GraphDecoder": "sparse_hf.hf",
    "CACHE_CLASSES": "sparse_hf.hf",
    "build_cache": "sparse_hf.hf",
    "install": "sparse_hf.hf",
    "prepare_model": "sparse_hf.hf",
    "METHODS": "sparse_hf.methods",
    "get_method": "sparse_hf.methods",
    "KVUsage": "sparse_hf.usage",
    "kv_usage": "sparse_hf.usage",
    "LLM": "sparse_hf.engine",
    "SamplingParams": "sparse_hf.engine",
    "RequestOutput": "sparse_hf.engine",
}


def _cache_classes() -> dict:
    """``{"SnapKVCache": SnapKVCache, ...}``: one HF cache class per registered method."""
    from .hf import CACHE_CLASSES
    return {cls.__name__: cls for cls in CACHE_CLASSES.values()}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name == "__all__":
        value = sorted(set(_EXPORTS) - {"install", "CACHE_CLASSES"}) + sorted(_cache_classes())
    elif name.endswith("Cache") and name in _cache_classes():
        value = _cache_classes()[name]
    else:
        raise AttributeError(f"module 'sparse_hf' has no attribute {name!r}")
    if "sparse_hf.hf" in sys.modules:
        _install()
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _install() -> None:
    from .hf import install
    install()


def _register_method_names() -> None:
    """Add the method names to the ``cache_implementation`` values ``GenerationConfig.validate`` accepts.

    ``generate`` validates its config before it prepares the cache, and a ``GenerationConfig(cache_implementation=
    "snapkv")`` validates at once, so the names must be known as soon as transformers is, not at the first
    ``generate`` call. Imports only the method registry (core: no transformers) and transformers' config module."""
    from transformers.generation import configuration_utils

    from .methods import METHODS

    known = tuple(configuration_utils.ALL_CACHE_IMPLEMENTATIONS)
    configuration_utils.ALL_CACHE_IMPLEMENTATIONS = known + tuple(n for n in METHODS if n not in known)


def _install_on_first_generate() -> None:
    """Make the first ``generate`` call register the sparse caches, then run as registered.

    Called right after ``transformers`` is imported. It does not import ``sparse_hf.hf`` there and then:
    that import may itself be what is importing transformers (a circular import). The placeholder carries
    ``_sparse_hf_wrapped`` so that an explicit :func:`install` before the first call leaves it in place."""
    from transformers.generation.utils import GenerationMixin

    _register_method_names()
    original = GenerationMixin._prepare_cache_for_generation
    if getattr(original, "_sparse_hf_wrapped", False):
        return

    def install_then_prepare(self, *args, **kwargs):
        if GenerationMixin._prepare_cache_for_generation is install_then_prepare:
            GenerationMixin._prepare_cache_for_generation = original
        _install()
        return GenerationMixin._prepare_cache_for_generation(self, *args, **kwargs)

    install_then_prepare._sparse_hf_wrapped = True
    GenerationMixin._prepare_cache_for_generation = install_then_prepare


class _InstallWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """One-shot import hook: once ``transformers`` has finished importing, :func:`_install_on_first_generate`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)                  # one shot; the other finders locate the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            _install_on_first_generate()

        spec.loader.exec_module = exec_then_install
        return spec


if "transformers" in sys.modules:
    _install_on_first_generate()
elif not any(isinstance(f, _InstallWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _InstallWhenTransformersLoads())
