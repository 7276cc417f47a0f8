"""Helpers shared by the synthetic tasks: seeded randomness, filler text, and sizing a prompt in tokens.

Every synthetic sample is rendered by a function ``render(n) -> (prompt, answer_prefix)`` of one integer, the
number of filler units (sentences, list entries, words) in its haystack. :func:`fit_to_length` picks the
largest ``n`` whose prompt fits the target token count for the model's own tokenizer, so the "context length"
of a sample means the same thing whatever the tokenizer.
"""

from __future__ import annotations

import random
import string
from typing import Callable

from .words import WORDS

Render = Callable[[int], "tuple[str, str]"]


def sample_rng(seed: int, *parts) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and the sample's coordinates (stable across runs/processes).

    String seeds are hashed with SHA-512 by ``random``, independently of ``PYTHONHASHSEED``.
    """
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def number(rng: random.Random, digits: int = 7) -> str:
    """A random ``digits``-digit number without a leading zero."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def distinct_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` numbers of ``digits`` digits, all different (the whole draw is repeated until they are)."""
    values = [number(rng, digits) for _ in range(count)]
    while len(set(values)) < count:
        values = [number(rng, digits) for _ in range(count)]
    return values


def word_key(rng: random.Random, used: set[str] | None = None) -> str:
    """A fresh hyphenated two-word key such as ``"amber-river"`` (never reused within ``used``)."""
    while True:
        key = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if used is None or key not in used:
            if used is not None:
                used.add(key)
            return key


def letter_name(rng: random.Random, used: set[str], length: int = 5) -> str:
    """A fresh upper-case name such as ``"QXJTM"``, for variable-tracking tasks."""
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(length))
        if name not in used:
            used.add(name)
            return name


def sentences(rng: random.Random, count: int) -> list[str]:
    """``count`` filler sentences of 6-14 random common words, capitalised and ending with a period."""
    out = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def insert_at(units: list[str], items: list[tuple[float, str]]) -> list[str]:
    """Insert each ``(fraction, text)`` into ``units`` at ``round(fraction * len(units))``; ties keep order."""
    n = len(units)
    slots: dict[int, list[str]] = {}
    for frac, text in items:
        slots.setdefault(min(n, max(0, round(frac * n))), []).append(text)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(slots.get(i, ()))
        if i < n:
            out.append(units[i])
    return out


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without special tokens (the chat template is not counted)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_to_length(tokenizer, render: Render, target: int, max_units: int, task: str = "task") -> tuple[int, int]:
    """Largest ``n`` in ``[0, max_units]`` with ``tokens(render(n)) <= target``; returns ``(n, tokens)``.

    Token counts grow (almost) monotonically with ``n``, so an interpolation search that falls back to bisection
    finds ``n`` in a handful of tokenizations even for 100k-token prompts. Raises ``ValueError`` when even the
    empty haystack does not fit, and ``OverflowError`` when ``max_units`` units do not reach ``target`` (the
    caller then retries with more units).
    """
    cache: dict[int, int] = {}

    def length(n: int) -> int:
        if n not in cache:
            prompt, prefix = render(n)
            cache[n] = count_tokens(tokenizer, prompt + prefix)
        return cache[n]

    if length(0) > target:
        raise ValueError(f"{task}: context length {target} is too small; the prompt without any haystack "
                         f"already takes {length(0)} tokens")
    if length(max_units) <= target:
        raise OverflowError(max_units)
    lo, hi = 0, max_units  # invariant: length(lo) <= target < length(hi)
    for step in range(64):
        if hi - lo <= 1:
            break
        if step < 6:  # interpolation between the bracket ends
            slope = (length(hi) - length(lo)) / (hi - lo)
            guess = lo + int((target - length(lo)) / max(slope, 1e-9))
            guess = min(hi - 1, max(lo + 1, guess))
        else:
            guess = (lo + hi) // 2
        if length(guess) <= target:
            lo = guess
        else:
            hi = guess
    return lo, length(lo)


def fit_units(tokenizer, make_units: Callable[[int], list], build: Callable[[list, int], "tuple[str, str]"],
              target: int, units_per_token: float, task: str) -> tuple[int, int, list]:
    """Generate enough units for ``target`` tokens, then fit; grows the unit pool until it is large enough.

    ``make_units(count)`` deterministically returns a pool of ``count`` units (it is called again with a
    doubled count when the pool is too small); ``build(pool, n)`` renders the prompt from the first ``n`` units.
    ``units_per_token`` is a rough guess that only sizes the first pool. Returns ``(n, tokens, pool)``.
    """
    count = max(16, int(target * units_per_token * 1.3) + 16)
    for _ in range(8):
        pool = make_units(count)
        try:
            n, tokens = fit_to_length(tokenizer, lambda k: build(pool, k), target, len(pool), task)
            return n, tokens, pool
        except OverflowError:
            count *= 2
    raise RuntimeError(f"{task}: could not reach {target} tokens")  # pragma: no cover
