"""The OpenAI wire format of the server: request models, error bodies, and the mapping to ``SamplingParams``.

Requests are pydantic models that accept unknown fields (clients send extras) but refuse OpenAI features the
engine does not implement (``n > 1``, ``logprobs``, penalties, ...) with a 400 naming the field. Responses are
plain dicts in the OpenAI shapes (``text_completion``, ``chat.completion``, ``chat.completion.chunk``).
Extra body fields (``extra_body=`` in the ``openai`` client): ``top_k``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``return_token_ids`` (each choice and stream chunk also carries its token ids; a stream
then sends one chunk per engine step even when the text did not grow), and ``sparse_knobs`` (a dict of the HF path's ``cache_config`` names, validated by
:class:`sparse_hf.config.SparseConfig`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from .sampling_params import SamplingParams

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error the client caused (4xx) or the server hit (5xx), rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints (OpenAI's, then the extras)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict | None = None
    user: StrictStr | None = None
    # extras
    top_k: StrictInt | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None
    sparse_knobs: dict[str, Any] | None = None
    return_token_ids: StrictBool = False     # each choice / chunk also carries its token ids

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per request (n=1)",
                           param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise APIError(400, f"{name} is not supported by this server; leave it 0", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The ``SamplingParams``; a bad value becomes a 400 whose ``param`` is the field."""
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_tokens=self.min_tokens,
                      stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                      seed=self.seed, max_tokens=max_tokens)
        fields = {k: v for k, v in fields.items() if v is not None or k == "max_tokens"}
        try:
            return SamplingParams(**fields)
        except ValueError as exc:
            param = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param=param if param in fields else None) from None


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise APIError(400, "send one prompt per request (a string or a list of token ids)", param="prompt")
            self.prompt = self.prompt[0]
        if not self.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        for name, default in (("echo", False), ("logprobs", None), ("best_of", None), ("suffix", None)):
            if getattr(self, name) not in (default, 1 if name == "best_of" else default):
                raise APIError(400, f"{name} is not supported by this server", param=name)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported, got type={part.get('type')!r}",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    tools: list | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise APIError(400, "logprobs is not supported by this server", param="logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid, model, text, finish_reason, usage_dict, chunk=False) -> dict:
    """A ``text_completion`` response, or one streamed chunk of it (``usage_dict`` None in chunks)."""
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if not chunk or usage_dict is not None:
        body["usage"] = usage_dict
    return body


def chat_body(rid, model, text, finish_reason, usage_dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage_dict}


def chat_chunk(rid, model, delta: dict | None, finish_reason=None, usage_dict=None) -> dict:
    """One ``chat.completion.chunk``; ``delta`` None gives the usage-only chunk (empty ``choices``)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_dict is not None:
        body["usage"] = usage_dict
    return body
