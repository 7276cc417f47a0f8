"""``EngineLoop``: one engine driven from one background thread, for the HTTP server.

The engine is single-threaded. The loop runs ``add_request`` / ``abort`` / ``stats`` on its thread as commands
(their results and errors come back through ``concurrent.futures.Future``), runs ``step()`` while work is pending,
and hands each ``RequestOutput`` to the callback of its request (the server's asyncio queue). A failed step fails
the requests in flight and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time

log = logging.getLogger("sparse_hf.server")
TOKENS_PER_S_WINDOW_S = 10.0
FAILED_STEP_BACKOFF_S = 0.1


class EngineLoop:
    """Runs one engine in a background thread; thread-safe ``submit``/``abort``/``stats`` for the HTTP side."""

    def __init__(self, llm, idle_wait_s: float = 0.05):
        self.llm = llm
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict = {}          # request_id -> callable(RequestOutput | Exception), engine thread only
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._token_times: collections.deque = collections.deque()   # (time, tokens) of the last 10 s
        self.counters = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="sparse-hf-engine", daemon=True)
        self._thread.start()

    # --- called from any thread ---------------------------------------------------------------------------
    def call(self, fn) -> concurrent.futures.Future:
        """Run ``fn()`` on the engine thread; its result or exception comes back through the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    async def submit(self, request_id: str, prompt_ids: list[int], params) -> asyncio.Queue:
        """Add a request; its outputs (and a step error, as an exception) arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def add():
            self.llm.add_request(request_id, prompt_ids, params)
            self._sinks[request_id] = lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item)
            self.counters["requests_total"] += 1
            self.counters["prompt_tokens_total"] += len(prompt_ids)

        await asyncio.wrap_future(self.call(add))
        return outputs

    def abort(self, request_id: str) -> concurrent.futures.Future:
        def abort():
            if self._sinks.pop(request_id, None) is not None:
                self.llm.abort(request_id)
                self.counters["requests_aborted_total"] += 1
        return self.call(abort)

    def stats(self) -> concurrent.futures.Future:
        """A future of the engine's ``stats()`` plus the loop's counters and tokens/s over the last 10 s."""
        return self.call(self._stats)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def close(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._commands.put((lambda: None, concurrent.futures.Future()))
        self._thread.join(timeout_s)

    # --- engine thread ------------------------------------------------------------------------------------
    def _stats(self) -> dict:
        stats = dict(self.llm.stats())
        now = time.monotonic()
        self._trim_token_times(now)
        window = sum(n for _, n in self._token_times)
        stats.update(self.counters)
        stats["generation_tokens_per_s"] = window / TOKENS_PER_S_WINDOW_S
        stats["open_streams"] = len(self._sinks)
        return stats

    def _trim_token_times(self, now: float) -> None:
        while self._token_times and self._token_times[0][0] < now - TOKENS_PER_S_WINDOW_S:
            self._token_times.popleft()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.llm.has_unfinished_requests())
            if self._stop.is_set() or not self.llm.has_unfinished_requests():
                continue
            try:
                outputs = self.llm.step()
            except Exception as exc:   # keep serving: fail the requests in flight, not the server
                if self._sinks:
                    log.exception("engine step failed; failing %d request(s) in flight", len(self._sinks))
                self._fail_all(exc)
                self._stop.wait(FAILED_STEP_BACKOFF_S)   # a persistent failure must not spin the CPU
                continue
            self._deliver(outputs)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs) -> None:
        produced = 0
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            produced += 1 if out.finish_reason != "abort" else 0
            if sink is None:
                continue
            sink(out)
            if out.finished:
                del self._sinks[out.request_id]
                self.counters[f"requests_finished_{out.finish_reason}_total"] += 1
        self.counters["generation_tokens_total"] += produced
        self._token_times.append((time.monotonic(), produced))
        self._trim_token_times(time.monotonic())

    def _fail_all(self, exc: Exception) -> None:
        for request_id, sink in list(self._sinks.items()):
            sink(exc)
            try:
                self.llm.abort(request_id)
            except Exception:  # noqa: BLE001 - best effort after a failed step
                log.exception("abort after a failed step")
        self._sinks.clear()
