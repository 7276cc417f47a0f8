"""SnapKV: keep the prompt tokens that the last prompt queries attend to most (Li et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TopTokensConfig, check_count, check_odd, check_positive, knob, resolve_count
from ..kernels import snapkv_prefill_scores
from .base import EvictionMethod
from .selection import (check_selection_scope, max_pool_scores, select_keep, select_keep_shared,
                        sink_recent_candidates)


def snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor,
                  query_valid: torch.Tensor | None, scaling: float, pool_kernel_size: int,
                  scope: str = "kv_head", reduce_heads=None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every candidate token as seen from an observation window of queries.

    Per query head: softmax of ``scaling * q.k`` over the candidate tokens only, averaged over the window's
    real queries, then max-pooled along the sequence; finally the max over the query heads of each KV group
    (``scope="kv_head"``) or over all query heads of the layer (``scope="layer"``, the reference SnapKV).

    Args:
        queries: ``[B, H, W, D]`` the last ``W`` prompt queries (post-RoPE).
        keys: ``[B, Hkv, L, D]`` post-RoPE keys.
        candidates: ``[B, Hkv, L]`` bool, tokens that may be chosen.
        query_valid: ``[B, W]`` bool or ``None`` (all real).
        scaling: softmax scale.
        pool_kernel_size: odd max-pool width (1 = no pooling).
        scope: ``"kv_head"`` or ``"layer"``.
        reduce_heads: tensor parallelism (``scope="layer"`` only): ``reduce_heads(x, "max")`` turns this rank's max
            over its heads into the max over every head of the layer (see ``EvictionMethod.prefill_keep``).
        valid: ``[B, Hkv, L]`` bool, the slots that hold a token, or ``None`` (all of them). The pooling's
            neighbours are the next valid tokens, whatever empty slots lie between them (a row of a batched cache
            can hold holes), so a row scores alike alone or in any batch.

    Returns:
        float32 scores, ``[B, Hkv, L]`` (``"kv_head"``) or ``[B, 1, L]`` (``"layer"``, candidates of KV head 0);
        non-candidates are ``-inf``.
    """
    # The kernel entry point (Triton on CUDA, the chunked torch reference elsewhere) reduces over the window and
    # the heads without a [B, Hkv, G, W, L] tensor; max-pooling commutes with the head max, so pool after it.
    head_reduce = {"kv_head": "group", "layer": "all"}[check_selection_scope("scope", scope)]
    scores = snapkv_prefill_scores(queries, keys, candidates, scaling, query_valid, head_reduce=head_reduce)
    if reduce_heads is not None and head_reduce == "all":
        scores = reduce_heads(scores.contiguous(), "max")
    present = None if valid is None else valid[:, :scores.shape[1]]
    scores = max_pool_scores(scores, pool_kernel_size, present=present)        # over the row's tokens in order
    return scores.masked_fill(~candidates[:, :scores.shape[1]], float("-inf"))


@dataclass(frozen=True)
class SnapKVConfig(TopTokensConfig):
    """SnapKV's knobs: the shared ones plus the observation window, the pooling width and unevicted layers."""

    method_name = "snapkv"

    window_size: int = knob(32, check_positive, "last prompt queries that score the tokens")
    pool_kernel_size: int = knob(7, check_odd, "max-pool width over the scores (odd)")
    snapkv_num_full_layers: int = knob(0, check_count, "first layers that keep everything")
    selection_scope: str = knob("layer", check_selection_scope,
                                "kv_head: each KV head keeps its own tokens (max over its query heads); layer: one "
                                "selection for all KV heads (max over all query heads, the reference)")

    def validate(self) -> None:
        if self.num_recent_tokens < self.window_size:
            raise ValueError(
                f"num_recent_tokens={self.num_recent_tokens} is smaller than window_size={self.window_size}; "
                "the observation window must lie inside the kept recent tokens (raise num_recent_tokens or lower "
                "window_size)")


class SnapKV(EvictionMethod):
    """Keeps sink + top-``num_top_tokens`` (by :func:`snapkv_scores`) + recent tokens of every layer.

    Eviction runs once, when the prompt is complete. ``num_top_tokens`` is a count or a fraction of each
    row's prompt length. ``selection_scope="kv_head"``: each KV head keeps its own tokens (scored by the max over
    its query heads); ``"layer"``: one set of tokens, scored by the max over all query heads, kept in every KV head.
    """

    name = "snapkv"
    config_class = SnapKVConfig

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.config.window_size

    @classmethod
    def knobs_for_budget(cls, fraction, prompt_len):
        knobs = super().knobs_for_budget(fraction, prompt_len)
        return dict(knobs, window_size=max(1, min(32, knobs["num_recent_tokens"])))

    def validate(self) -> None:
        if self.config.snapkv_num_full_layers > self.num_layers:
            raise ValueError(f"snapkv_num_full_layers={self.config.snapkv_num_full_layers} exceeds the "
                             f"{self.num_layers} layers")

    def layer_top_count(self, layer_idx: int, prompt_len: int) -> int:
        """Middle tokens layer ``layer_idx`` keeps for a prompt of ``prompt_len`` tokens."""
        return resolve_count(self.config.num_top_tokens, prompt_len)

    def prefill_keep(self, layer_idx, keys, valid, queries, query_valid, scaling, reduce_heads=None):
        c = self.config
        if layer_idx < c.snapkv_num_full_layers or queries is None:
            return None
        n_valid = valid.sum(-1).amax(-1)                                       # [B]
        tops = torch.tensor([self.layer_top_count(layer_idx, int(n)) for n in n_valid.tolist()],
                            dtype=torch.long, device=valid.device)
        keep = c.num_sink_tokens + c.num_recent_tokens + tops
        if bool((keep >= n_valid).all()):
            return None                                                        # nothing to evict
        _, _, cand = sink_recent_candidates(valid, c.num_sink_tokens, c.num_recent_tokens)
        scores = snapkv_scores(queries, keys, cand, query_valid, scaling, c.pool_kernel_size, c.selection_scope,
                               reduce_heads, valid=valid)
        select = select_keep_shared if c.selection_scope == "layer" else select_keep
        return select(valid, scores, c.num_sink_tokens, c.num_recent_tokens, tops)
