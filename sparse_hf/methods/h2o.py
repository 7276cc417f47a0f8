"""H2O, the heavy-hitter oracle (Zhang et al., 2023): keep the sinks, the recent tokens and the tokens that have
received the most attention so far, re-evicting at every decode step under a fixed budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TopTokensConfig, knob, resolve_counts
from ..kernels import attention_mass, decode_attention_mass
from .base import EvictionMethod
from .selection import lowest_candidate, select_keep, sink_recent_candidates


SCORE_NORMALIZATIONS = ("sum", "mean")


def check_score_normalization(name: str, value) -> str:
    if value not in SCORE_NORMALIZATIONS:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(SCORE_NORMALIZATIONS)}")
    return value


@dataclass(frozen=True)
class H2OConfig(TopTokensConfig):
    """H2O's knobs: the shared ones, and how the accumulated attention ranks tokens. ``num_top_tokens`` (a count
    or a fraction of each row's prompt) heavy hitters are kept beyond sinks and recent tokens, at prefill and at
    every decode step."""

    method_name = "h2o"

    score_normalization: str = knob("sum", check_score_normalization,
                                    "sum: the accumulated attention (the H2O authors' rule); mean: divided by the "
                                    "number of queries that saw the token (kvpress ObservedAttentionPress)")


def normalized_scores(scores: torch.Tensor, positions: torch.Tensor, newest: torch.Tensor,
                      mode: str) -> torch.Tensor:
    """The ranking score of each slot from its accumulated attention mass.

    ``"sum"`` ranks by the mass itself (FMInference/H2O). It favours early tokens: a token at position ``p`` has
    been seen by ``newest - p + 1`` queries, so the start of a long prompt collects most of the mass. ``"mean"``
    divides by that count (NVIDIA/kvpress ``ObservedAttentionPress``): the average attention a token received from
    the queries that could see it. The count is exact for a row whose queries covered every position from its
    first token to ``newest`` (prompt chunks and decode steps both do; left padding is never a query); the
    constant factor of the KV group's query heads is left in, as it does not change the ranking.

    Args:
        scores: ``[..., L]`` float accumulated mass; positions: ``[..., L]`` logical positions (any int dtype;
            slots that hold no token may hold anything and get an arbitrary finite score).
        newest: the newest position of each row, broadcast against ``[..., 1]``.
        mode: ``"sum"`` or ``"mean"``.

    Returns:
        ``[..., L]`` scores in ``scores``' dtype.
    """
    if check_score_normalization("score_normalization", mode) == "sum":
        return scores
    seen = (newest.long() - positions.long() + 1).clamp_min(1)
    return scores / seen.to(scores.dtype)


class H2O(EvictionMethod):
    """Keeps sink + the ``num_top_tokens`` heavy hitters + recent tokens, per KV head.

    A token's score is its accumulated attention (:func:`attention_mass`: summed over every query seen so far,
    prompt and generated, and over the query heads of its KV group), ranked as is or per query that saw it
    (``score_normalization``, :func:`normalized_scores`). When the prompt is complete each row keeps
    ``budget = sinks + recent + top`` slots; at every decode step the new token joins and, once a row holds more
    than its budget, the lowest-scored middle token leaves. The HF path accumulates a decode step's mass with
    static shapes (captured in CUDA graphs) and, in the steady state (every row at its budget), drops that one token
    with :meth:`decode_evict_one_in_order` (slots in logical order, padding anywhere), else through
    :meth:`decode_keep`; the engine drops it with :meth:`decode_evict_one`. All three find the same token, the last
    two with one ``argmin`` (:func:`~sparse_hf.methods.selection.lowest_candidate`) and no host sync.
    """

    name = "h2o"
    config_class = H2OConfig
    evicts_during_decode = True
    accumulates_attention = True

    def accumulate(self, queries, keys, key_pos, key_valid, query_pos, query_valid, scaling, *,
                   backend: str = "auto", slots: torch.Tensor | None = None, lse: torch.Tensor | None = None):
        """:func:`~sparse_hf.kernels.attention_mass` (``backend="auto"``: Triton on CUDA in fp16/bf16, the torch
        reference elsewhere; the optional ``[B, L]`` slot table ``slots`` and the queries' ``[B, H, q]`` log-sum-exp
        ``lse`` from the attention, which saves the kernel's first pass, as there)."""
        return attention_mass(queries, keys, key_pos, key_valid, query_pos, query_valid, scaling, backend=backend,
                              slots=slots, lse=lse)

    def accumulate_logits(self, logits: torch.Tensor, num_kv_heads: int, *, backend: str = "auto") -> torch.Tensor:
        return decode_attention_mass(logits, num_kv_heads, backend)

    def row_budget(self, valid: torch.Tensor) -> torch.Tensor:
        """``[B]`` long: sinks + recent + top per row, top resolved against the row's real prompt tokens."""
        c = self.config
        return c.num_sink_tokens + c.num_recent_tokens + resolve_counts(c.num_top_tokens, valid.sum(-1).amax(-1))

    def _ranking_scores(self, scores, valid, positions):
        """:func:`normalized_scores` of ``[B, Hkv, L]`` slots, each row's newest position from its valid slots."""
        mode = self.config.score_normalization
        if mode == "sum":
            return scores
        if positions is None:
            raise ValueError(f"h2o with score_normalization={mode!r} needs the slots' positions ([B, Hkv, L]) to "
                             "count the queries that saw each token")
        newest = positions.masked_fill(~valid, -1).amax(-1, keepdim=True)
        return normalized_scores(scores, positions, newest, mode)

    def _keep(self, valid, scores, budget, positions):
        c = self.config
        if not bool((valid.sum(-1).amax(-1) > budget).any()):
            return None
        scores = self._ranking_scores(scores, valid, positions)
        top = (budget - c.num_sink_tokens - c.num_recent_tokens).clamp_min(0)
        return select_keep(valid, scores, c.num_sink_tokens, c.num_recent_tokens, top)

    def prefill_keep(self, layer_idx, keys, valid, queries, query_valid, scaling, reduce_heads=None):
        """From every prompt query at once (``queries`` ``[B, H, L, D]``, slot ``i`` = column ``i``); the HF cache
        accumulates per prefill chunk instead (:meth:`accumulate` + :meth:`prefill_keep_scored`)."""
        L = keys.shape[2]
        if queries is None or queries.shape[2] != L:
            raise ValueError(f"{self.name} scores tokens by the attention of every prompt query: pass all {L} "
                             "prompt queries, or accumulate per chunk with accumulate() and prefill_keep_scored()")
        cols = torch.arange(L, device=keys.device)
        mass = self.accumulate(queries, keys, cols.expand_as(valid), valid, cols, query_valid, scaling)
        return self.prefill_keep_scored(layer_idx, valid, mass, positions=cols.expand_as(valid))

    def prefill_keep_scored(self, layer_idx, valid, scores, positions=None):
        """``positions`` ``[B, Hkv, L]``: the slots' logical positions, needed unless ``score_normalization`` is
        ``"sum"``."""
        return self._keep(valid, scores, self.row_budget(valid), positions)

    def decode_keep(self, layer_idx, valid, scores=None, row_budget=None, positions=None):
        if scores is None or row_budget is None:
            raise ValueError("h2o's decode_keep needs the accumulated scores and the row budgets")
        return self._keep(valid, scores, row_budget, positions)

    def decode_evict_one(self, scores: torch.Tensor, positions: torch.Tensor, newest: torch.Tensor,
                         live: torch.Tensor):
        """The steady-state decode eviction: a row that holds exactly ``budget + 1`` tokens (its budget, then this
        step's token) drops one, the lowest-scored middle token; the same token :meth:`decode_keep` drops then, found
        with one ``argmin`` and static shapes, with the tokens in any slot order (the engine moves the newest token
        into the dropped one's slot instead of compacting the row).

        Sinks and recent tokens are told by logical position, which equals :meth:`decode_keep`'s rank rule for a
        row whose positions start at 0 with no gap in its prompt (the engine's rows): its first ``num_sink_tokens``
        and its last ``num_recent_tokens`` positions are never evicted, so they are always present.

        Args:
            scores: ``[..., L]`` float32 accumulated attention mass; positions: ``[..., L]`` logical positions.
            newest: positions of each row's newest token, broadcast against ``[..., 1]``.
            live: ``[..., L]`` bool, slots that hold a token (a row's first ``budget + 1``).

        Returns:
            ``(idx, found)`` as in :func:`~sparse_hf.methods.selection.lowest_candidate` (``found`` is ``False`` only
            where a row has no middle token: never for a row of ``budget + 1`` tokens).
        """
        c = self.config
        candidate = live & (positions >= c.num_sink_tokens) & (positions <= newest - c.num_recent_tokens)
        scores = normalized_scores(scores, positions, newest, c.score_normalization)
        return lowest_candidate(scores, positions, candidate)

    def decode_evict_one_in_order(self, scores: torch.Tensor, valid: torch.Tensor,
                                  positions: torch.Tensor | None = None):
        """:meth:`decode_evict_one` for slots in increasing logical order with empty (padding, evicted) slots
        anywhere, as in the HF path's layers: sinks and recent tokens are told by *rank* among a row's valid slots
        (:func:`~sparse_hf.methods.selection.sink_recent_candidates`, the split :meth:`decode_keep` uses), so left
        padding and earlier evictions do not matter; ties go as in :meth:`decode_keep` (the slot index is the
        logical order). Static shapes, no host sync.

        One difference, on NaN scores only (as for :meth:`decode_evict_one`): :func:`select_keep` ranks a NaN middle
        token above the protected ones (priority ``inf``), so with more NaN candidates than ``top`` it drops a sink
        or recent token; this rule never does (it picks among the middle tokens only).

        Args:
            scores: ``[B, Hkv, L]`` float32 accumulated attention mass; valid: ``[B, Hkv, L]`` bool.
            positions: ``[B, Hkv, L]`` the slots' logical positions, needed unless ``score_normalization`` is
                ``"sum"`` (the same ranking score :meth:`decode_keep` uses, :func:`normalized_scores`).

        Returns:
            ``(idx, found)`` ``[B, Hkv]``: the slot :meth:`decode_keep` drops from a row of exactly ``budget + 1``
            valid tokens, and whether the row has a middle token (always, for such a row).
        """
        c = self.config
        scores = self._ranking_scores(scores, valid, positions)
        _, _, candidate = sink_recent_candidates(valid, c.num_sink_tokens, c.num_recent_tokens)
        order = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
        return lowest_candidate(scores, order, candidate)
