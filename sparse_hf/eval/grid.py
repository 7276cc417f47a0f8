"""Parsing and validating the evaluation grid (methods, budgets, lengths, depths) with clear errors.

Each parser takes a comma-separated string (as typed on the command line) or an iterable, and raises
``ValueError`` naming the offending item and what was expected.
"""

from __future__ import annotations

from ..methods import METHODS

#: ``full`` is vanilla ``generate``; the others are the sparse caches registered by ``import sparse_hf``.
SPARSE_METHODS = tuple(METHODS)   # every registered method; a new method needs no change here
VALID_METHODS = ("full",) + SPARSE_METHODS


def _items(spec, what: str) -> list:
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (int, float)):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise ValueError(f"no {what} given")
    return items


def parse_methods(spec) -> list[str]:
    """``"full,snapkv"`` -> ``["full", "snapkv"]``; unknown names raise."""
    out = []
    for item in _items(spec, "method"):
        name = str(item).strip().lower()
        if name not in VALID_METHODS:
            raise ValueError(f"unknown method {item!r}; valid methods: {', '.join(VALID_METHODS)}")
        out.append(name)
    return list(dict.fromkeys(out))


def _number(item, kind, what: str):
    try:
        return kind(item)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {item!r} is not a number") from None


def parse_budgets(spec) -> list[float]:
    """Budget fractions of the prompt, each in (0, 1]."""
    out = []
    for item in _items(spec, "budget"):
        value = _number(item, float, "budget")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget {item!r} must be a fraction of the prompt in (0, 1]")
        out.append(value)
    return sorted(set(out))


def parse_lengths(spec) -> list[int]:
    """Context lengths in tokens, each a positive integer."""
    out = []
    for item in _items(spec, "length"):
        value = _number(item, float, "length")
        if value != int(value) or value <= 0:
            raise ValueError(f"length {item!r} must be a positive whole number of tokens")
        out.append(int(value))
    return sorted(set(out))


def parse_depths(spec) -> list[float]:
    """Needle depths, each a fraction in [0, 1] (0 = start of the haystack, 1 = end)."""
    out = []
    for item in _items(spec, "depth"):
        value = _number(item, float, "depth")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"depth {item!r} must be a fraction in [0, 1]")
        out.append(value)
    return sorted(set(out))
