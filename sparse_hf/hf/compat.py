"""Names that differ between the transformers releases sparse-hf supports (5.17 up to the latest 5.x)."""

from __future__ import annotations

import inspect


def cache_argument(forward) -> str:
    """The keyword ``forward`` (a model's ``forward``, bound or wrapped) takes the KV cache by: ``"cache"`` from
    transformers 5.25 on (``past_key_values`` is deprecated there, to be removed in 5.40), ``"past_key_values"``
    before. Passing the new name where it exists keeps every decode step free of the deprecation warning."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):        # a builtin or C-level callable: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
