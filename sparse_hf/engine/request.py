"""Per-request state (``Request``) and what ``step()`` returns for it (``RequestOutput``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestOutput:
    """A request's state after a step.

    Attributes:
        prompt_token_ids: the prompt (one list shared by every output of the request: read-only).
        token_ids: every token generated so far; text: their detokenised text.
        finish_reason: ``None`` while running, else ``"stop"``, ``"length"`` or ``"abort"``.
        metrics: ``ttft_s``, ``decode_tok_s``, ``num_preemptions``, ``kept_kv_tokens`` (slots the request holds,
            summed over layers, at its last step).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)


class Request:
    """One sequence: its tokens, its row in the pool, and how many of its tokens have K/V in the pool.

    Lifecycle: waiting -> running (prefill chunks until ``num_computed == prefill_end``; the last chunk's logits
    give the first new token) -> running (decode: one token per step) -> finished. Preemption drops the row and
    sends it back to waiting with ``num_computed = 0``, to be recomputed:

    - full attention (``replay=False``): prompt and generated tokens are recomputed as one prompt (exact, and fast);
    - a sparse method (``replay=True``): its decode differs from its prefill (evictions, scores, flushes), so only
      the prompt is prefilled again (its sampled token is discarded), then the generated tokens are *replayed*:
      fed one per decode step as forced inputs (their sampled tokens discarded), batched with the other decode
      rows, so every method's state is rebuilt as in the uninterrupted run. The step fed the last generated token
      gives the next new token. A request samples (and streams) a token only after a step that leaves
      ``num_computed == num_tokens``.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: Any):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self._output_prompt: list[int] | None = None     # the prompt copy every RequestOutput shares (see output())
        self.output_token_ids: list[int] = []
        self.params = params
        self.row: int | None = None
        self.num_computed = 0
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.replay = False                   # preempted under a sparse method: generated tokens are replayed
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.kept_kv_tokens = 0
        self.text = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def prefill_end(self) -> int:
        """Tokens the prefill computes: the prompt when replaying (see the class doc), else every token."""
        return len(self.prompt_token_ids) if self.replay else self.num_tokens

    @property
    def in_prefill(self) -> bool:
        """True while the request still prefills: a prompt, or a recompute after preemption (of the prompt only,
        when replaying; else of every token but the newest, which a decode step may take)."""
        if self.replay:
            return self.num_computed < len(self.prompt_token_ids)
        return not self.output_token_ids or self.num_computed < self.num_tokens - 1

    @property
    def replaying(self) -> bool:
        """True while its next decode step feeds an already generated token other than the newest (a step whose
        sampled token is discarded)."""
        return self.replay and len(self.prompt_token_ids) <= self.num_computed < self.num_tokens - 1

    @property
    def samples(self) -> bool:
        """Whether the step just run gives this request a new token: its K/V now cover every token (a replayed
        token or a replayed request's prompt leave ``num_computed < num_tokens``: nothing is sampled)."""
        return self.num_computed == self.num_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def preempt(self, replay: bool = False) -> None:
        """Back to waiting, to be recomputed from scratch; ``replay``: prefill the prompt only and replay the
        generated tokens as decode steps (a sparse method; see the class doc)."""
        self.row = None
        self.num_computed = 0
        self.num_preemptions += 1
        self.replay = replay and bool(self.output_token_ids)

    def metrics(self) -> dict:
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival_time
        decode_tok_s = None
        n = len(self.output_token_ids)
        if n > 1 and self.last_token_time is not None and self.last_token_time > self.first_token_time:
            decode_tok_s = (n - 1) / (self.last_token_time - self.first_token_time)
        return {"ttft_s": ttft, "decode_tok_s": decode_tok_s, "num_generated": n,
                "num_preemptions": self.num_preemptions, "kept_kv_tokens": self.kept_kv_tokens}

    def output(self) -> RequestOutput:
        """The request's state now. ``prompt_token_ids`` is one copy of the prompt shared by all outputs of this
        request (copying a 128K-token prompt at every step cost ~0.6 ms of host time per step): read-only."""
        if self._output_prompt is None:
            self._output_prompt = list(self.prompt_token_ids)
        return RequestOutput(self.request_id, self._output_prompt, list(self.output_token_ids), self.text,
                             self.finished, self.finish_reason, self.metrics())
