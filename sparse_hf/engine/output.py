"""Per-request output text: incremental detokenisation and the stop rules.

The engine calls :meth:`OutputProcessor.update` once per new token per request::

    proc = OutputProcessor(tokenizer)                       # eos ids from the tokenizer unless given
    state = proc.new_state(prompt_token_ids, params)        # one per request
    delta, finished, reason = proc.update(state, token_id)  # reason: None | 'stop' | 'length'
    state.text, state.token_ids                             # the output so far

Detokenisation decodes a sliding window of ids (the last few already-emitted ids plus the new ones) and emits
only what the window adds, holding back text that ends in an incomplete UTF-8 sequence (``'\\ufffd'``), so
multi-byte characters split over several byte-level tokens come out whole and each step costs O(window).
Stop strings: while streaming, the last ``len(longest stop) - 1`` characters are held back, so the deltas never
contain text that a later stop string cuts away; the concatenated deltas always equal ``state.text``.
Order of the stop checks (once ``min_tokens`` tokens exist): EOS (unless ``ignore_eos``), ``stop_token_ids``,
stop strings, then ``max_tokens`` / ``max_total_len`` -> ``'length'``. The text of an EOS or stop token is
never in the output; its id is in ``token_ids``. When a request ends (except by a stop string), bytes still held
back are decoded, so the final text is the decode of all output ids before any EOS / stop id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5  # prompt ids decoded with the first output ids, so a leading space survives


@dataclass
class TextState:
    """What one request has produced: ids, decoded text, and the detokeniser's window offsets."""

    params: SamplingParams
    prompt_len: int
    max_total_len: int | None
    window_ids: list[int]          # the last prompt ids, then every output id (decoding context)
    prefix_offset: int             # window_ids[prefix_offset:read_offset] is already-emitted context
    read_offset: int               # window_ids[read_offset:] is not decoded into ``decoded`` yet
    token_ids: list[int] = field(default_factory=list)
    decoded: str = ""              # all output text decoded so far, before any stop-string cut
    text: str = ""                 # the output text (cut before a stop string once finished)
    emitted: int = 0               # characters of ``text`` already returned as deltas
    finished: bool = False
    finish_reason: str | None = None


class OutputProcessor:
    """Turns sampled ids into text deltas and finish decisions for any number of requests."""

    def __init__(self, tokenizer, eos_token_ids=None) -> None:
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = tuple(eos_token_ids)

    def new_state(self, prompt_token_ids, params: SamplingParams, max_total_len: int | None = None) -> TextState:
        """The state of a new request. ``max_total_len``: prompt + output length at which it ends ('length')."""
        context = list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]
        return TextState(params=params, prompt_len=len(prompt_token_ids), max_total_len=max_total_len,
                         window_ids=context, prefix_offset=0, read_offset=len(context))

    def update(self, state: TextState, token_id: int) -> tuple[str, bool, str | None]:
        """Add one sampled id: returns ``(text_delta, finished, finish_reason)``."""
        if state.finished:
            raise RuntimeError("update() called on a finished request")
        token_id = int(token_id)
        state.token_ids.append(token_id)
        params = state.params
        checks_on = len(state.token_ids) >= params.min_tokens
        if checks_on and token_id in params.ending_token_ids(self.eos_token_ids):
            return self._finish(state, "stop")
        state.window_ids.append(token_id)
        state.decoded += self._decode_new(state)
        stop_at = self._find_stop(state) if checks_on else -1
        if stop_at >= 0:
            state.text = state.decoded[:stop_at]
            return self._finish(state, "stop", flush=False)
        state.text = state.decoded
        if params.max_tokens is not None and len(state.token_ids) >= params.max_tokens:
            return self._finish(state, "length")
        if state.max_total_len is not None and state.prompt_len + len(state.token_ids) >= state.max_total_len:
            return self._finish(state, "length")
        holdback = max((len(s) for s in params.stop), default=1) - 1
        visible = max(state.emitted, len(state.text) - holdback)
        delta = state.text[state.emitted:visible]
        state.emitted = visible
        return delta, False, None

    def finish(self, state: TextState, reason: str) -> str:
        """End a request from outside (e.g. ``'abort'``); returns the text still held back."""
        return self._finish(state, reason)[0]

    def _finish(self, state: TextState, reason: str, flush: bool = True) -> tuple[str, bool, str]:
        """End the request. ``flush``: decode ids still held back as an incomplete character, so that the final
        text is the decode of every output id (a ``'\ufffd'`` stays where bytes never completed)."""
        if flush:
            state.decoded += self._decode_new(state, final=True)
            state.text = state.decoded
        state.finished, state.finish_reason = True, reason
        delta = state.text[state.emitted:]
        state.emitted = len(state.text)
        return delta, True, reason

    def _decode_new(self, state: TextState, final: bool = False) -> str:
        """The text the ids after ``read_offset`` add, or '' while it ends in an incomplete character (unless
        ``final``)."""
        ids = state.window_ids
        decode = self.tokenizer.decode
        before = decode(ids[state.prefix_offset:state.read_offset], skip_special_tokens=True)
        after = decode(ids[state.prefix_offset:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        state.prefix_offset, state.read_offset = state.read_offset, len(ids)
        return after[len(before):]

    @staticmethod
    def _find_stop(state: TextState) -> int:
        """The earliest index of a stop string in the decoded text, searching only where new text could match."""
        stops = state.params.stop
        if not stops:
            return -1
        longest = max(len(s) for s in stops)
        start = max(0, len(state.text) - longest + 1)
        hits = [i for i in (state.decoded.find(s, start) for s in stops) if i >= 0]
        return min(hits, default=-1)
