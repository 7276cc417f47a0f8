"""``SamplingParams``: how one request picks its tokens and when it stops.

A frozen dataclass validated at construction: every invalid value raises a ``ValueError`` that names the field,
the value and the allowed range, so the server can hand the message to the client as it is.

Stop rules (applied by :mod:`sparse_hf.engine.output`, in this order, once ``min_tokens`` tokens exist):
EOS (unless ``ignore_eos``), ``stop_token_ids``, the ``stop`` strings (the text is cut before the stop string),
then ``max_tokens`` (``finish_reason='length'``). While fewer than ``min_tokens`` tokens exist the sampler masks
the tokens that would end the request (``stop_token_ids``, and EOS unless ``ignore_eos``) and stop strings are
not checked.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping.

    Parameters
    ----------
    temperature : float >= 0. ``0`` is greedy (exact argmax, ``top_p``/``top_k``/``seed`` then have no effect).
    top_p : float in (0, 1]. Nucleus sampling: keep the fewest most likely tokens whose probability sums to at
        least ``top_p``. ``1`` is off.
    top_k : int, ``0`` or ``-1`` for off, else >= 1: keep the ``top_k`` most likely tokens.
    max_tokens : int >= 1, or ``None`` for "until the model's length limit".
    min_tokens : int >= 0 and <= ``max_tokens``: no stop rule fires before this many tokens.
    stop : a string or a list of non-empty strings. The output text is cut before the first stop string.
    stop_token_ids : token ids >= 0 that end the request (their text is not in the output).
    ignore_eos : keep generating past EOS (EOS is then an ordinary token).
    seed : int in [-2**63, 2**64 - 1], or ``None``. A seeded request draws the same tokens from the same logits
        whatever else is in its batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)):
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 for off, got {self.top_k!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                             f"and max_tokens={self.max_tokens}")
        object.__setattr__(self, "stop", self._normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalise_stop_ids(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None and (not _is_int(self.seed) or not (SEED_MIN <= self.seed <= SEED_MAX)):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1] or None, got {self.seed!r}")

    @staticmethod
    def _normalise_stop(stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
        return tuple(items)

    @staticmethod
    def _normalise_stop_ids(ids) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {ids!r}")
        return tuple(ids)

    @property
    def greedy(self) -> bool:
        """Exact argmax decoding (``temperature == 0``)."""
        return self.temperature == 0

    def ending_token_ids(self, eos_token_ids) -> tuple[int, ...]:
        """The ids that end this request: ``stop_token_ids``, plus ``eos_token_ids`` unless ``ignore_eos``."""
        eos = () if self.ignore_eos else tuple(eos_token_ids)
        return tuple(dict.fromkeys(eos + self.stop_token_ids))

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
