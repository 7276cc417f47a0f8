"""KNorm: keep the tokens whose keys have the *smallest* L2 norm (Devoto et al., 2024).

Low-norm keys tend to receive high attention, so no query is needed to score them: the cheapest
scorer there is, and a useful baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TopTokensConfig, resolve_counts
from .base import EvictionMethod
from .selection import select_keep, sink_recent_candidates


@dataclass(frozen=True)
class KNormConfig(TopTokensConfig):
    """KNorm's knobs: the shared ones (sinks, recent, ``num_top_tokens``)."""

    method_name = "knorm"


def knorm_scores(keys: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``keys`` ``[B, Hkv, L, D]`` -> ``[B, Hkv, L]`` scores ``-||k||`` (non-candidates ``-inf``)."""
    return (-keys.float().norm(dim=-1)).masked_fill(~candidates, float("-inf"))


class KNorm(EvictionMethod):
    """Keeps sink + the ``num_top_tokens`` lowest-key-norm tokens + recent, per KV head, once the prompt is
    complete. ``num_top_tokens`` is a count or a fraction of each row's prompt."""

    name = "knorm"
    config_class = KNormConfig

    def prefill_keep(self, layer_idx, keys, valid, queries, query_valid, scaling):
        c = self.config
        n_valid = valid.sum(-1).amax(-1)
        tops = resolve_counts(c.num_top_tokens, n_valid)
        if bool((c.num_sink_tokens + c.num_recent_tokens + tops >= n_valid).all()):
            return None
        _, _, cand = sink_recent_candidates(valid, c.num_sink_tokens, c.num_recent_tokens)
        return select_keep(valid, knorm_scores(keys, cand), c.num_sink_tokens, c.num_recent_tokens, tops)
