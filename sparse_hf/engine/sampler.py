"""Batched next-token sampling on the device: greedy, temperature, top-k, top-p, min_tokens, per-request seeds.

One call handles a whole decode batch ``[B, V]`` with one set of tensor ops; per-row knobs travel as small
``[B]`` tensors built on the host from the ``SamplingParams`` (no device-to-host sync for them). Sampling uses the
exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` i.i.d. per token draws exactly from ``p``. The noise of a
seeded row depends only on ``(seed, step)`` (a generator reseeded per row and step from a mixed 64-bit key), so a
seeded request gets the same token from the same logits whatever else is in its batch; unseeded rows draw their
noise from the default generator in one call. A request replaying its generated tokens after a preemption samples
nothing during the replay (:class:`~.request.Request`), so its next token draws at the same step as uninterrupted.
The only host sync is one read of ``steps`` when the batch has seeded rows.
"""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def seed_for_step(seed: int, step: int) -> int:
    """A 64-bit generator seed from a request seed and its step (SplitMix64 finaliser over both)."""
    x = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (step + 1) * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Sampler:
    """``Sampler()(logits, params, steps, eos_token_ids) -> [B] long`` token ids.

    - ``logits``: ``[B, V]`` float32 (cast if not), the last position of each row.
    - ``params``: ``B`` ``SamplingParams``.
    - ``steps``: ``[B]`` long, the tokens each row has generated so far (before this one); on the host or the
      device (moved only when ``min_tokens`` or sampling needs it, so an all-greedy batch copies nothing).
    - ``eos_token_ids``: the model's EOS ids (needed for ``min_tokens`` to hold EOS back).

    Rows with ``steps < min_tokens`` cannot draw the ids that would end them (``stop_token_ids``, and EOS unless
    ``ignore_eos``). Greedy rows return the exact argmax of the (masked) logits, the first index on ties.
    """

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: torch.Tensor,
                 eos_token_ids=()) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [B, V] with B == len(params) == {len(params)}, "
                             f"got {tuple(logits.shape)}")
        logits = logits.float()
        device = logits.device
        logits = self._mask_ending_tokens(logits, params, steps, tuple(eos_token_ids))
        greedy_tokens = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_tokens
        sampled = self._sample(logits, params, steps)
        greedy_rows = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(greedy_rows, greedy_tokens, sampled)

    @staticmethod
    def _mask_ending_tokens(logits, params, steps, eos_token_ids) -> torch.Tensor:
        """-inf on each row's ending ids while ``steps < min_tokens``; ``logits`` ``[B, V]``."""
        rows, cols = [], []
        for row, p in enumerate(params):
            if p.min_tokens > 0:
                ids = [i for i in p.ending_token_ids(eos_token_ids) if i < logits.shape[1]]
                rows += [row] * len(ids)
                cols += ids
        if not rows:
            return logits
        device = logits.device
        min_tokens = torch.tensor([p.min_tokens for p in params], device=device)
        rows_t = torch.tensor(rows, device=device)
        cols_t = torch.tensor(cols, device=device)
        active = steps.to(device)[rows_t] < min_tokens[rows_t]
        masked = logits.clone()
        masked[rows_t, cols_t] = torch.where(active, torch.tensor(float("-inf"), device=device),
                                             logits[rows_t, cols_t])
        return masked

    def _sample(self, logits, params, steps) -> torch.Tensor:
        """Temperature, then top-k and top-p per row, then the exponential race; ``[B, V] -> [B]``."""
        device = logits.device
        temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
        logits = logits / temperature[:, None]
        vocab = logits.shape[1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(tp < 1 for tp in top_p):
            logits = self._filter_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = self._exponential_noise(probs, params, steps)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _filter_top_k_top_p(logits, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        """-inf outside each row's top-k / top-p support; ``logits`` ``[B, V]`` (already temperature-scaled)."""
        device = logits.device
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=device)[None, :]
        keep = rank < torch.tensor(top_k, device=device)[:, None]
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        top_p_t = torch.tensor(top_p, device=device)[:, None]
        keep &= (mass_before < top_p_t) | (top_p_t >= 1)
        keep_vocab = torch.zeros_like(keep).scatter(1, order, keep)
        return logits.masked_fill(~keep_vocab, float("-inf"))

    def _exponential_noise(self, probs, params, steps) -> torch.Tensor:
        """``Exp(1)`` noise ``[B, V]``; seeded rows from ``(seed, step)`` only, the rest from the default RNG."""
        noise = torch.empty_like(probs).exponential_()
        seeded = [row for row, p in enumerate(params) if p.seed is not None and not p.greedy]
        if seeded:
            host_steps = steps.tolist()
            generator = self._generator(probs.device)
            for row in seeded:
                generator.manual_seed(seed_for_step(params[row].seed, host_steps[row]))
                noise[row].exponential_(generator=generator)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]
