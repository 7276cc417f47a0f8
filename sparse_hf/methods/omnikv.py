"""OmniKV: a few full-attention filter layers choose the tokens that the sparse layers after them read
(Hao et al., ICLR 2025). Nothing is evicted: this is logical masking."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import (DEFAULT_FULL_ATTN_LAYERS, TopTokensConfig, check_budget, check_flag, check_layer_list, check_odd,
                      knob, resolve_count, resolve_counts)
from .base import SelectionMethod
from .selection import max_pool_scores, select_keep, select_keep_static, sink_recent_candidates


def omnikv_decode_scores(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Decode-time token scores of a filter layer.

    Args:
        logits: ``[B, H, L]`` scaled ``q.k`` of the current query for every head.
        candidates: ``[B, L]`` bool.

    Returns:
        ``[B, L]``: per-head softmax over the candidates, then the max over heads (non-candidates ``-inf``).
    """
    masked = logits.float().masked_fill(~candidates.unsqueeze(1), float("-inf"))
    probs = torch.softmax(masked, dim=-1).nan_to_num(0.0)
    return probs.amax(1).masked_fill(~candidates, float("-inf"))


def omnikv_prefill_scores(logits: torch.Tensor, candidates: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """Chunked-prefill scores (``chunk_prefill_accel_omnikv``): raw ``q.k`` averaged over the chunk's real
    queries, max over heads.

    Args:
        logits: ``[B, H, q, L]``; candidates: ``[B, L]`` bool; query_valid: ``[B, q]`` bool.
    """
    w = query_valid.to(torch.float32).view(logits.shape[0], 1, -1, 1)
    mean = (logits.float() * w).sum(2) / w.sum(2).clamp_min(1.0)
    return mean.amax(1).masked_fill(~candidates, float("-inf"))


@dataclass(frozen=True)
class OmniKVConfig(TopTokensConfig):
    """OmniKV's knobs: the shared ones (``num_top_tokens`` is a count or a fraction of the current length), the
    filter layers and the chunked-prefill acceleration."""

    method_name = "omnikv"

    full_attn_layers: tuple[int, ...] | None = knob(None, check_layer_list,
                                                    "filter layers, '0,1,2' or a list (None: the reference's)")
    chunk_prefill_accel_omnikv: bool = knob(False, check_flag, "sparse layers read a selection during prefill chunks")
    num_top_tokens_in_prefill: int | float = knob(8192, check_budget, "selection size for prefill chunks")
    pool_kernel_size: int = knob(7, check_odd, "max-pool width over the observer's scores before the top-k (odd; "
                                               "1 = none, the reference engine's; 7 measured better, see README)")

    def resolved_full_attn_layers(self, num_layers: int) -> tuple[int, ...]:
        """Filter layers for a model with ``num_layers`` layers (defaults: the reference's, cut to the depth)."""
        if self.full_attn_layers is None:
            return tuple(layer for layer in DEFAULT_FULL_ATTN_LAYERS if layer < num_layers)
        bad = [layer for layer in self.full_attn_layers if layer >= num_layers]
        if bad:
            raise ValueError(f"full_attn_layers {bad} out of range: the model has {num_layers} layers "
                             f"(0..{num_layers - 1})")
        return self.full_attn_layers


class OmniKV(SelectionMethod):
    """Filter layers (``full_attn_layers``, which must include layer 0) run full attention. The last filter
    layer before a run of sparse layers (the *observation* layer) scores every candidate token
    ``[sink, len - recent)`` and selects the top ``num_top_tokens`` (a count, or a fraction of the current
    length); the sparse layers up to the next filter layer attend only to sink + selected + recent.
    """

    name = "omnikv"
    family = "mask"
    config_class = OmniKVConfig

    def validate(self) -> None:
        self.full_layers = self.config.resolved_full_attn_layers(self.num_layers)
        if 0 not in self.full_layers:
            raise ValueError(f"{self.name}: full_attn_layers={list(self.full_layers)} must include layer 0, the "
                             "first filter layer (the sparse layers need a selection to read)")
        self.obs_layers = {i for i in self.full_layers if i + 1 < self.num_layers and i + 1 not in self.full_layers}

    def is_full(self, layer_idx: int) -> bool:
        return layer_idx in self.full_layers

    def is_observer(self, layer_idx: int) -> bool:
        return layer_idx in self.obs_layers

    def top_count(self, length: int, prefill: bool) -> int:
        budget = self.config.num_top_tokens_in_prefill if prefill else self.config.num_top_tokens
        return resolve_count(budget, length)

    def select_decode(self, logits: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, reduce_scores=None,
                      scores: torch.Tensor | None = None, in_order: bool = False):
        """Selection of an observation layer at a decode step (see :meth:`SelectionMethod.select_decode`).

        The output size is fixed by the slot count ``L`` (a fraction budget resolves against ``L`` for it and
        against ``lengths`` for each row's budget), so nothing here waits for the device. ``reduce_scores``: applied
        to the ``[B, L]`` scores before the top-k (tensor parallelism: an all-reduce max over the ranks, each of
        which holds some of the heads, so every rank selects what one rank with all heads would). ``scores``: the
        ``[B, L]`` :meth:`decode_scores` when the caller computed them already (a fused kernel), else ``None``."""
        c = self.config
        L = valid.shape[-1]
        top_max = self.top_count(L, prefill=False)
        if c.num_sink_tokens + c.num_recent_tokens + top_max >= L:
            return None
        top = resolve_counts(c.num_top_tokens, lengths)
        if scores is None:
            scores = self.decode_scores(logits, valid)
        if reduce_scores is not None:
            scores = reduce_scores(scores)
        scores = self.pool_scores(scores, present=None if in_order else valid)
        idx, ok = select_keep_static(valid.unsqueeze(1), scores.unsqueeze(1), c.num_sink_tokens,
                                     c.num_recent_tokens, top, c.num_sink_tokens + c.num_recent_tokens + top_max)
        return idx[:, 0], ok[:, 0]

    def pool_scores(self, scores: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L]`` observer scores, each candidate raised to the max of the ``pool_kernel_size`` tokens around it
        (the reference HF path's optional pooling, as SnapKV's): a token next to a strongly read one is kept with it,
        so a needle's digits are not picked one by one as decoding walks along them. Non-candidates (``-inf``:
        sinks, recent, padding, empty slots) stay ``-inf``. Positions along ``L`` are the row's tokens in order;
        ``present`` (``[B, L]`` bool, optional) marks the slots holding tokens where a row may have holes, so that
        neighbours are the next tokens whatever lies between them. Static shapes, no host sync."""
        k = self.config.pool_kernel_size
        if k <= 1:
            return scores
        return torch.where(torch.isneginf(scores), scores, max_pool_scores(scores, k, present=present))

    def decode_scores(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The observer's scores of the candidates (neither sink nor recent): ``logits [B, H, L]``, ``valid
        [B, L]`` -> ``[B, L]`` (see :func:`omnikv_decode_scores`)."""
        c = self.config
        _, _, cand = sink_recent_candidates(valid.unsqueeze(1), c.num_sink_tokens, c.num_recent_tokens)
        return omnikv_decode_scores(logits, cand[:, 0])

    def select_prefill_chunk(self, logits: torch.Tensor, valid: torch.Tensor, query_valid: torch.Tensor):
        """Selection of an observation layer for a later prefill chunk of ``q`` tokens.

        Args:
            logits: ``[B, H, q, L]`` (``L`` includes the chunk itself, at the end); valid: ``[B, L]`` bool;
            query_valid: ``[B, q]`` bool.

        Returns:
            ``(idx, ok)`` ``[B, K]`` over the context before the chunk (sink + top + recent), or ``None``.
        """
        c = self.config
        q = logits.shape[2]
        ctx_valid = valid[:, : valid.shape[1] - q]
        n = ctx_valid.sum(-1)
        tops = torch.tensor([self.top_count(int(x), prefill=True) for x in n.tolist()], device=valid.device)
        if bool((n <= c.num_sink_tokens + c.num_recent_tokens + tops).all()):
            return None
        _, _, cand = sink_recent_candidates(ctx_valid.unsqueeze(1), c.num_sink_tokens, c.num_recent_tokens)
        scores = omnikv_prefill_scores(logits[..., : ctx_valid.shape[1]], cand[:, 0], query_valid)
        scores = self.pool_scores(scores, present=ctx_valid)
        idx, ok = select_keep(ctx_valid.unsqueeze(1), scores.unsqueeze(1), c.num_sink_tokens, c.num_recent_tokens,
                              tops)
        return idx[:, 0], ok[:, 0]
