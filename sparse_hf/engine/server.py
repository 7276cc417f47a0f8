"""An OpenAI-compatible HTTP server over one ``LLM``: FastAPI routes, SSE streaming, auth, metrics.

The engine is single-threaded: :class:`EngineLoop` owns it in one background thread, runs ``add_request`` /
``abort`` / ``stats`` there as commands (their errors come back through futures) and ``step()`` while work is
pending, and hands each ``RequestOutput`` to the asyncio queue of its HTTP request. A client that disconnects
(or a cancelled stream) aborts its request, which frees its KV slots.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming with ``"stream": true``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Every client error is a 4xx with an
OpenAI error body; ``--api-key`` guards the ``/v1`` routes (401 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import server_protocol as proto
from .server_loop import EngineLoop
from .server_protocol import APIError

log = logging.getLogger("sparse_hf.server")
DISCONNECT_POLL_S = 0.5


def engine_max_len(llm) -> int | None:
    """The engine's ``max_model_len`` (prompt + output), where it exposes one."""
    for owner in (llm, getattr(llm, "config", None), getattr(llm, "engine_config", None)):
        value = getattr(owner, "max_model_len", None)
        if isinstance(value, int):
            return value
    return None


class OpenAIServer:
    """Request handling shared by the standalone server and the Ray Serve replica."""

    def __init__(self, llm, model_name: str, api_key: str | None = None):
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.tokenizer = llm.tokenizer
        self.engine = EngineLoop(llm)
        self.max_len = engine_max_len(llm)
        model_config = getattr(getattr(llm, "model", None), "config", None)
        self.vocab_size = getattr(model_config, "vocab_size", None) or len(self.tokenizer)

    def close(self) -> None:
        self.engine.close()

    # --- request -> (prompt ids, params) ------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prompt_ids(self, req) -> list[int]:
        if self.tokenizer is None and not (isinstance(req, proto.CompletionRequest) and isinstance(req.prompt, list)):
            raise APIError(400, "this server has no tokenizer: send /v1/completions with a prompt of token ids",
                           param="prompt" if isinstance(req, proto.CompletionRequest) else "messages")
        if isinstance(req, proto.ChatCompletionRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                               param="messages")
            text = self.tokenizer.apply_chat_template(req.conversation(), tokenize=False,
                                                      add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(req.prompt, str):
            return list(self.tokenizer.encode(req.prompt))
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(req.prompt)

    def params(self, req, prompt_len: int, max_tokens: int | None):
        if self.max_len is not None:
            if prompt_len >= self.max_len:
                raise APIError(400, f"this model's maximum context length is {self.max_len} tokens, but the prompt "
                               f"has {prompt_len}; shorten it", param="prompt", code="context_length_exceeded")
            if max_tokens is None:
                max_tokens = self.max_len - prompt_len
            elif isinstance(max_tokens, int) and max_tokens >= 1 and prompt_len + max_tokens > self.max_len:
                raise APIError(400, f"this model's maximum context length is {self.max_len} tokens, but "
                               f"{prompt_len} prompt tokens + max_tokens={max_tokens} exceed it; lower max_tokens",
                               param="max_tokens", code="context_length_exceeded")
        params = req.sampling_params(max_tokens)
        self.check_sparse_knobs(req.sparse_knobs)
        return params

    def check_sparse_knobs(self, knobs: dict | None) -> None:
        """Validate per-request sparse knobs (the HF path's ``cache_config`` names and rules). The engine serves
        one method with one knob set, so a knob must equal the served value; another value is a 400 that says
        so (start another server for other knobs)."""
        if not knobs:
            return
        from ..config import SparseConfig
        try:
            SparseConfig.from_dict(knobs)
        except (ValueError, TypeError) as exc:
            raise APIError(400, f"sparse_knobs: {exc}", param="sparse_knobs") from None
        method = getattr(self.llm, "method", None)
        served = getattr(method, "config", None)
        if served is None:
            raise APIError(400, "sparse_knobs given, but this server runs full attention (no --sparse-method)",
                           param="sparse_knobs")
        different = {k: v for k, v in knobs.items() if getattr(served, k) != v}
        if different:
            name = getattr(method, "name", type(method).__name__)
            served_values = {k: getattr(served, k) for k in different}
            raise APIError(400, f"sparse_knobs {different} differ from the served {name} knobs {served_values}; "
                           "this server applies one knob set to every request (start another server for other "
                           "knobs)", param="sparse_knobs")


class _RequestStream:
    """The text deltas of one request, read from its output queue; ``close()`` aborts it unless finished.

    While streaming, the last ``len(longest stop string) - 1`` characters and a trailing ``'\\ufffd'`` (bytes of
    a character not complete yet) are held back until the request ends, so a stop-string cut or a completed
    character never takes back text a client has already received."""

    def __init__(self, server: "OpenAIServer", http: Request, request_id: str, outputs: asyncio.Queue, params):
        self.server, self.http, self.request_id, self.outputs = server, http, request_id, outputs
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.finished = False
        self.last = None

    async def deltas(self):
        """Yields ``(text_delta, new_token_ids, RequestOutput)`` until the request finishes; stops early if the
        client left."""
        sent, num_ids = "", 0
        while not self.finished:
            try:
                item = await asyncio.wait_for(self.outputs.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await self.http.is_disconnected():
                    return
                continue
            if isinstance(item, Exception):
                self.finished = True      # the loop has already dropped it
                raise APIError(500, f"the engine failed while generating: {item}")
            text = item.text
            visible = len(text)
            if not item.finished:     # hold back a possible stop-string start and an incomplete character
                visible -= self.holdback
                while visible > len(sent) and text[visible - 1] == "\ufffd":
                    visible -= 1
                visible = max(visible, len(sent))
            delta = text[len(sent):visible] if text.startswith(sent) else ""
            sent += delta
            self.finished, self.last = item.finished, item
            new_ids, num_ids = item.token_ids[num_ids:], len(item.token_ids)
            yield delta, new_ids, item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.server.engine.abort(self.request_id)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _Generation:
    """The shared flow of both endpoints: validate, submit, then answer whole or as SSE chunks."""

    @staticmethod
    async def run(server: OpenAIServer, http: Request, chat: bool):
        body = await _json_body(http)
        req = _validate(proto.ChatCompletionRequest if chat else proto.CompletionRequest, body)
        server.check_model(req.model)
        req.refuse_unsupported()
        ids = server.prompt_ids(req)
        params = server.params(req, len(ids), req.requested_max_tokens() if chat else req.max_tokens)
        rid = proto.new_id("chatcmpl" if chat else "cmpl")
        try:
            outputs = await server.engine.submit(rid, ids, params)
        except ValueError as exc:    # the engine's own admission checks (e.g. a prompt the pool can never hold)
            raise APIError(400, str(exc), param="prompt") from None
        stream = _RequestStream(server, http, rid, outputs, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_Generation.sse(server, stream, chat, rid, len(ids), include_usage,
                                                     bool(req.return_token_ids)),
                                     media_type="text/event-stream")
        try:
            text = "".join([delta async for delta, _, _ in stream.deltas()])
        finally:
            stream.close()
        if not stream.finished or stream.last is None:
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        out = stream.last
        usage = proto.usage(len(ids), len(out.token_ids))
        make = proto.chat_body if chat else proto.completion_body
        body = make(rid, server.model_name, text, out.finish_reason, usage)
        return JSONResponse(_with_ids(body, out.token_ids) if req.return_token_ids else body)

    @staticmethod
    async def sse(server: OpenAIServer, stream: _RequestStream, chat: bool, rid: str, prompt_len: int,
                  include_usage: bool, return_token_ids: bool):
        """SSE chunks: text deltas (and, with ``return_token_ids``, one chunk per engine output with its new ids,
        even when the text did not grow), the finish reason, the usage if asked, then ``[DONE]``."""
        model = server.model_name
        try:
            if chat:
                yield _sse(proto.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            async for delta, new_ids, out in stream.deltas():
                reason = out.finish_reason if out.finished else None
                send_ids = return_token_ids and bool(new_ids)
                if chat:
                    if delta or send_ids:
                        chunk = proto.chat_chunk(rid, model, {"content": delta})
                        yield _sse(_with_ids(chunk, new_ids) if send_ids else chunk)
                    if out.finished:
                        yield _sse(proto.chat_chunk(rid, model, {}, reason))
                elif delta or out.finished or send_ids:
                    chunk = proto.completion_body(rid, model, delta, reason, None, chunk=True)
                    yield _sse(_with_ids(chunk, new_ids) if return_token_ids else chunk)
            if include_usage and stream.last is not None:
                usage = proto.usage(prompt_len, len(stream.last.token_ids))
                yield _sse(proto.chat_chunk(rid, model, None, usage_dict=usage) if chat else
                           {**proto.completion_body(rid, model, "", None, usage, chunk=True), "choices": []})
        except APIError as exc:
            yield _sse(exc.body())
        finally:
            stream.close()
        yield "data: [DONE]\n\n"


def _with_ids(body: dict, token_ids) -> dict:
    """``body`` with ``token_ids`` in its choice (the ``return_token_ids`` extension)."""
    body["choices"][0]["token_ids"] = list(token_ids)
    return body


async def _json_body(http: Request) -> dict:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"could not parse the JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object")
    return body


def _validate(model_cls, body: dict):
    from pydantic import ValidationError
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        raise APIError(400, f"{'.'.join(loc)}: {first['msg']}", param=loc[0] if loc else None) from None


def _prometheus(stats: dict) -> str:
    lines = []
    for key, value in sorted(stats.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "sparse_hf_" + "".join(c if c.isalnum() else "_" for c in str(key))
        lines += [f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def build_app(llm, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``llm``; it starts the engine thread now and stops it at app shutdown."""
    import contextlib
    import hmac

    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = OpenAIServer(llm, model_name or "sparse-hf", api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.close()

    app = FastAPI(title="sparse-hf OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _Generation.run(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _Generation.run(server, request, chat=True)

    @app.get("/v1/models")
    async def models():
        card = {"id": server.model_name, "object": "model", "created": 0, "owned_by": "sparse-hf",
                "max_model_len": server.max_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        ok = server.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        stats = await asyncio.wrap_future(server.engine.stats())
        return PlainTextResponse(_prometheus(stats), media_type="text/plain; version=0.0.4")

    return app


def run_server(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               model_name: str | None = None, log_level: str = "info") -> None:
    """Serve ``llm`` until interrupted (uvicorn, one process; the engine in one background thread)."""
    import uvicorn
    uvicorn.run(build_app(llm, model_name, api_key), host=host, port=port, log_level=log_level)
