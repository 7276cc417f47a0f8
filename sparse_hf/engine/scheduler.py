"""Continuous batching: which requests run in the next step, and how many of their tokens.

Policy (plain Python, no model code):

- A step is a *prefill* step (chunks of up to ``chunk_prefill_size`` tokens of one or more requests,
  ``max_num_batched_tokens`` in all), a *decode* step (one token for every decoding row) or, with
  ``mixed_steps`` (the default), a *mixed* step: when rows decode and prompts wait, one step carries every decoding
  row's token plus prompt chunks filling the rest of ``max_num_batched_tokens`` (Sarathi-style), so decode rows
  get a token every step instead of waiting out each prefill step, and their step shares the prefill's weight
  reads. Without ``mixed_steps`` prefill and decode steps alternate, so neither starves. A step of decode rows
  only stays a decode step (a CUDA graph).
- Prefill serves requests in arrival order: first the ones already holding a row (mid-prompt), then waiting ones
  while fewer than ``max_num_seqs`` rows are taken. A chunk only takes free slots (a prompt holds one slot per
  token and layer until its eviction runs); a request that does not fit waits.
- DeltaKV's layer-wise prompts (``layerwise``, a :class:`~.deltakv_layerwise.LayerwiseRoute`) run as a step of
  their own, one prompt each, when it is their turn in arrival order (no prompt mid-way through its chunks, and
  not right after another prefill step while rows decode: decode rows wait during such a step, one step at a time)
  and their footprint fits with a slot to spare per row (so the next decode step needs no preemption): a slot per
  token in the filter layers, sinks + buffer in the compressed ones. Prompts behind one wait for it.
- Under memory pressure (a decode step lacks slots, or nothing at all can run) the most recently arrived running
  request is preempted: its slots are freed and it goes back to the front of the queue, to be recomputed (full
  attention: prompt and generated tokens as one prompt; a sparse method: the prompt, then the generated tokens
  replayed as decode steps, see :class:`~.request.Request`). A replaying row is a decode row like any other (one
  slot per step); preempted again, it starts over. The oldest request is never preempted while another runs, so
  none starves.
"""

from __future__ import annotations

from collections import deque


class Scheduler:
    """Args: config: :class:`~.config.EngineConfig`; pool: :class:`~.kv_pool.KVPool`; layerwise: which prompts run
    layer-wise (a :class:`~.deltakv_layerwise.LayerwiseRoute`, or ``None``: none)."""

    def __init__(self, config, pool, layerwise=None):
        self.config, self.pool, self.layerwise = config, pool, layerwise
        self.waiting: deque = deque()
        self.running: list = []                     # requests holding a row, in arrival order
        self.free_rows = list(range(pool.max_rows - 1, -1, -1))
        self.last_was_prefill = False
        #: Preempted requests replay their generated tokens as decode steps (every sparse method: its decode-time
        #: state differs from a prefill's); full attention recomputes them as a prompt.
        self.replays = config.sparse_method is not None

    def add(self, req) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- rows ------------------------------------------------------------------------------------------------
    def _admit(self, req) -> None:
        req.row = self.free_rows.pop()
        self.running.append(req)

    def release(self, req) -> None:
        """Free ``req``'s row and slots (finished, aborted or preempted)."""
        if req.row is not None:
            self.pool.release_row(req.row)
            self.free_rows.append(req.row)
            req.row = None
        if req in self.running:
            self.running.remove(req)

    def preempt_newest(self) -> None:
        victim = max(self.running, key=lambda r: r.arrival_time)
        self.release(victim)
        victim.preempt(replay=self.replays)
        self.waiting.appendleft(victim)

    # -- the step ----------------------------------------------------------------------------------------------
    def schedule(self):
        """``("prefill", [(request, n_tokens), ...])``, ``("decode", [request, ...])``, ``("mixed", ([(request,
        n_tokens), ...], [request, ...]))`` (prompt chunks, then decoding rows), ``("layerwise", request)`` (its whole
        prompt, layer by layer) or ``(None, [])``."""
        while True:
            decoding = [r for r in self.running if not r.in_prefill]
            whole = self._layerwise_prompt(bool(decoding))
            if whole is not None:
                return "layerwise", whole
            if decoding and self.config.mixed_steps and self._prefill_pending():
                chunks = self._mixed_chunks(len(decoding))
                if chunks:
                    self.last_was_prefill = False
                    return "mixed", (chunks, decoding)
            want_decode = bool(decoding) and (self.last_was_prefill or not self._prefill_pending())
            if not want_decode:
                chunks = self._prefill_chunks()
                if chunks:
                    self.last_was_prefill = True
                    return "prefill", chunks
            if decoding:
                if self.pool.num_free() >= len(decoding):
                    self.last_was_prefill = False
                    return "decode", decoding
                if len(self.running) == 1:
                    raise RuntimeError("the KV pool cannot hold one more token of the only running request; raise "
                                       "num_kv_slots or gpu_memory_utilization, or lower max_model_len")
                self.preempt_newest()
                continue
            if not self.running:
                return None, []
            if len(self.running) == 1 and self.waiting == deque():
                raise RuntimeError("the KV pool cannot hold the one running request (scheduler invariant broken)")
            self.preempt_newest()

    def _runs_layerwise(self, req) -> bool:
        return self.layerwise is not None and self.layerwise.takes(req.prefill_end)

    def _layerwise_prompt(self, decoding: bool):
        """The waiting head, admitted, when it runs layer-wise now (see the module docstring), else ``None``."""
        if not self.waiting or not self.free_rows or not self._runs_layerwise(self.waiting[0]):
            return None
        if (decoding and self.last_was_prefill) or any(r.in_prefill for r in self.running):
            return None
        req = self.waiting[0]
        headroom = len(self.running) + 1                  # the next decode step's token of every row, its own too
        if any(n + headroom > free for n, free in zip(self.layerwise.slots(req.prefill_end), self.pool.free_top)):
            return None                                   # waits until slots free up
        self.waiting.popleft()
        self._admit(req)
        self.last_was_prefill = True
        return req

    def _prefill_pending(self) -> bool:
        return bool(self.waiting) or any(r.in_prefill for r in self.running)

    def _mixed_chunks(self, num_decoding: int) -> list:
        """Prompt chunks that fit next to ``num_decoding`` decode tokens (token budget and free slots), or ``[]``."""
        budget = self.config.max_num_batched_tokens - num_decoding
        free = self.pool.num_free() - num_decoding
        if budget <= 0 or free <= 0:
            return []
        return self._prefill_chunks(budget, free)

    def _prefill_chunks(self, budget: int | None = None, free: int | None = None) -> list:
        """Chunks of prompts in arrival order within ``budget`` tokens (default ``max_num_batched_tokens``) and
        ``free`` slots (default all free slots)."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens if budget is None else budget
        free = self.pool.num_free() if free is None else free
        chunks = []
        for req in [r for r in self.running if r.in_prefill]:
            n = min(cfg.chunk_prefill_size, req.prefill_end - req.num_computed, budget, free)
            if n <= 0:
                break
            chunks.append((req, n))
            budget, free = budget - n, free - n
        while self.waiting and budget > 0 and self.free_rows:
            req = self.waiting[0]
            if self._runs_layerwise(req):      # its own step (:meth:`_layerwise_prompt`); later prompts wait for it
                break
            n = min(cfg.chunk_prefill_size, req.prefill_end, budget)
            if n > free:                       # waits until slots free up (no partial first chunk below a chunk)
                break
            self.waiting.popleft()
            self._admit(req)
            chunks.append((req, n))
            budget, free = budget - n, free - n
        return chunks
