"""KNorm: keep the tokens whose keys have the *smallest* L2 norm (Devoto et al., 2024).

Low-norm keys tend to receive high attention, so no query is needed to score them: the cheapest
scorer there is, and a useful baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TopTokensConfig, knob, resolve_counts
from .base import EvictionMethod
from .selection import check_selection_scope, select_keep, select_keep_shared, sink_recent_candidates


@dataclass(frozen=True)
class KNormConfig(TopTokensConfig):
    """KNorm's knobs: the shared ones (sinks, recent, ``num_top_tokens``) and the selection scope."""

    method_name = "knorm"

    selection_scope: str = knob("layer", check_selection_scope,
                                "kv_head: each KV head keeps its lowest-norm keys; layer: one selection for all KV "
                                "heads, by the mean over KV heads of the key norms")


def knorm_scores(keys: torch.Tensor, candidates: torch.Tensor, scope: str = "kv_head",
                 reduce_heads=None) -> torch.Tensor:
    """``keys`` ``[B, Hkv, L, D]`` -> scores ``-||k||`` (non-candidates ``-inf``): ``[B, Hkv, L]`` per KV head
    (``scope="kv_head"``), or ``[B, 1, L]`` ``-mean_h ||k_h||`` for the whole layer (``"layer"``; candidates of
    KV head 0). The mean, not the min or max, so that no single head's outlier norm decides for the layer.
    ``reduce_heads``: tensor parallelism (``"layer"`` only), ``reduce_heads(x, "mean")`` turns this rank's mean
    over its KV heads into the mean over every KV head of the layer."""
    norms = keys.float().norm(dim=-1)                                          # [B, Hkv, L]
    if check_selection_scope("scope", scope) == "layer":
        norms, candidates = norms.mean(1, keepdim=True), candidates[:, :1]
        if reduce_heads is not None:
            norms = reduce_heads(norms, "mean")
    return (-norms).masked_fill(~candidates, float("-inf"))


class KNorm(EvictionMethod):
    """Keeps sink + the ``num_top_tokens`` lowest-key-norm tokens + recent once the prompt is complete, per KV
    head or (``selection_scope="layer"``) one set for the layer by the mean norm over KV heads. ``num_top_tokens``
    is a count or a fraction of each row's prompt."""

    name = "knorm"
    config_class = KNormConfig

    def prefill_keep(self, layer_idx, keys, valid, queries, query_valid, scaling, reduce_heads=None):
        c = self.config
        n_valid = valid.sum(-1).amax(-1)
        tops = resolve_counts(c.num_top_tokens, n_valid)
        if bool((c.num_sink_tokens + c.num_recent_tokens + tops >= n_valid).all()):
            return None
        _, _, cand = sink_recent_candidates(valid, c.num_sink_tokens, c.num_recent_tokens)
        select = select_keep_shared if c.selection_scope == "layer" else select_keep
        scores = knorm_scores(keys, cand, c.selection_scope, reduce_heads)
        return select(valid, scores, c.num_sink_tokens, c.num_recent_tokens, tops)
