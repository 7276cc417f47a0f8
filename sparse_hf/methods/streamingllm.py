"""StreamingLLM: keep the attention sinks and a window of recent tokens (Xiao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodConfig
from .base import EvictionMethod, budget_tokens
from .selection import select_keep


@dataclass(frozen=True)
class StreamingLLMConfig(MethodConfig):
    """StreamingLLM's knobs: sinks and the recent window only."""

    method_name = "streamingllm"


class StreamingLLM(EvictionMethod):
    """Keeps ``num_sink_tokens`` + ``num_recent_tokens`` per row.

    The window rolls during decode too. To avoid a copy every step, the cache is trimmed back to
    sink + recent once it holds ``decode_slack`` more tokens (a quarter of the window, at least 8), so
    attention sees between ``num_recent_tokens`` and ``num_recent_tokens + decode_slack`` recent tokens. Each
    row follows this schedule on its own count of real tokens.
    """

    name = "streamingllm"
    config_class = StreamingLLMConfig
    evicts_during_decode = True

    @classmethod
    def knobs_for_budget(cls, fraction, prompt_len):
        """Sinks plus a recent window that together hold the budget (4 sinks at most)."""
        keep = budget_tokens(fraction, prompt_len)
        sink = min(4, keep - 1) if keep > 1 else 0
        return dict(num_sink_tokens=sink, num_recent_tokens=keep - sink)

    def validate(self) -> None:
        if self.config.num_sink_tokens + self.config.num_recent_tokens < 1:
            raise ValueError("streamingllm needs num_sink_tokens + num_recent_tokens >= 1")

    @property
    def decode_slack(self) -> int:
        return max(8, self.config.num_recent_tokens // 4)

    @property
    def decode_slot_limit(self) -> int:
        """A row is trimmed once it holds this many tokens, so a layer never needs more slots during decode."""
        return self.config.num_sink_tokens + self.config.num_recent_tokens + self.decode_slack

    def prefill_keep(self, layer_idx, keys, valid, queries, query_valid, scaling, reduce_heads=None):
        return self._trim(valid, self.config.num_sink_tokens + self.config.num_recent_tokens)

    def decode_keep(self, layer_idx, valid, scores=None, row_budget=None):
        if valid.shape[-1] < self.decode_slot_limit:   # a shape check: no host-device sync on the decode path
            return None
        return self._trim(valid, self.decode_slot_limit)

    def _trim(self, valid, due_at: int):
        """Trim back to sink + recent every row that holds at least ``due_at`` tokens; other rows keep all theirs.

        The schedule is per row, so a row's window does not depend on the other rows of its batch (or on their
        padding): alone or batched, a row is trimmed at the same steps.
        """
        c = self.config
        counts = valid.sum(-1, keepdim=True)                                  # [B, Hkv, 1]
        if int(counts.max()) <= c.num_sink_tokens + c.num_recent_tokens:
            return None
        recent = torch.where(counts >= due_at, c.num_recent_tokens, counts)   # not due: every token is "recent"
        return select_keep(valid, None, c.num_sink_tokens, recent, 0)
