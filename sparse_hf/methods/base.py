"""The small interface every sparse method implements.

A method owns its *policy*: how many tokens each layer keeps, how tokens are scored, and which are kept.
Caches (HF path) and the engine are thin adapters that call these hooks with plain tensors.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..config import SparseConfig


class SparseMethod:
    """Base class. Subclasses set ``name`` and ``family`` and override the hooks of their family.

    Families:
        ``"evict"``: tokens are physically removed after the prompt (and possibly during decode).
        ``"mask"``: every token stays in memory; sparse layers attend to a selected subset.
        ``"compress"``: old tokens are stored compressed; selected ones are reconstructed.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "evict"
    #: How many of the last prompt queries the method needs to score tokens (0: none).
    query_window: ClassVar[int] = 0

    def __init__(self, config: SparseConfig, num_layers: int):
        self.config = config
        self.num_layers = num_layers
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for configurations that cannot work with this method."""

    # -- eviction family -------------------------------------------------------------------------------------
    def prefill_keep(self, layer_idx: int, keys: torch.Tensor, valid: torch.Tensor,
                     queries: torch.Tensor | None, query_valid: torch.Tensor | None, scaling: float):
        """Which slots to keep once the prompt is complete.

        Args:
            keys: ``[B, Hkv, L, D]`` post-RoPE keys of the whole prompt.
            valid: ``[B, Hkv, L]`` bool, real (non-padding) slots.
            queries: ``[B, H, W, D]`` the last ``query_window`` prompt queries, or ``None``.
            query_valid: ``[B, W]`` bool, which of those queries are real tokens.
            scaling: the attention softmax scale.

        Returns:
            ``(idx, ok)`` from :func:`select_keep`, or ``None`` to keep everything.
        """
        return None

    def decode_keep(self, layer_idx: int, valid: torch.Tensor):
        """Which slots to keep after a decode step (``valid``: ``[B, Hkv, L]``), or ``None`` to keep all.

        Called at every decode step of every layer: decide from shapes where possible (no GPU sync)."""
        return None
