"""Stand-ins until helper F's ``sampling_params.py``, ``sampler.py`` and ``output.py`` land (branch wt-f).

``GreedySampler`` has the sampler's call signature; ``llm.py`` swaps it for ``Sampler()`` in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """Greedy-only subset of F's ``SamplingParams`` (same field names)."""

    temperature: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature != 0.0:
            raise NotImplementedError("temperature > 0 needs the engine sampler (helper F's branch)")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: expected an int >= 1")


class GreedySampler:
    """``(logits [B, V] float32, params: list, steps [B]) -> [B] long``: argmax."""

    def __call__(self, logits: torch.Tensor, params: list, steps: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)
