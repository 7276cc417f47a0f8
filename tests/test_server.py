"""The OpenAI-compatible server end to end on loopback: the real engine (``LLM``) on a tiny random Llama with an
offline BPE tokenizer, the official ``openai`` client, SSE streaming, 32 concurrent clients, 4xx errors, a
client disconnect that frees the KV pool, and the API key. Every wait is bounded."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from sparse_hf.engine import LLM                              # noqa: E402
from sparse_hf.engine.server import build_app                 # noqa: E402
from tiny_tokenizer import free_port, save_tiny_chat_model, tiny_chat_model, wait_for_health  # noqa: E402

MODEL = "tiny-llama"
MAX_LEN = 256


class ServerThread:
    """uvicorn on 127.0.0.1 and a free port, in a daemon thread; ``stop()`` waits at most 20 s."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


def client(url, api_key="none", async_=False):
    cls, http = (openai.AsyncOpenAI, httpx.AsyncClient) if async_ else (openai.OpenAI, httpx.Client)
    return cls(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120,
               http_client=http(trust_env=False, timeout=120))


@pytest.fixture(scope="module")
def served():
    model, tok = tiny_chat_model()
    llm = LLM(model, tok, max_model_len=MAX_LEN, max_num_seqs=8, num_kv_slots=4096)
    server = ServerThread(build_app(llm, MODEL))
    yield server, llm, model, tok
    server.stop()


def hf_greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def pool_whole(url, timeout_s=20.0) -> dict:
    """Poll /metrics until nothing runs or waits and no KV slot is used; return the last metrics."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False) as http:
        while True:
            text = http.get(url + "/metrics").text
            metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                       if line and not line.startswith("#")}
            if (metrics["sparse_hf_running"] == 0 and metrics["sparse_hf_waiting"] == 0
                    and metrics["sparse_hf_kv_used_tokens_all_layers"] == 0 and metrics["sparse_hf_open_streams"] == 0):
                return metrics
            assert time.monotonic() < deadline, f"the pool did not become whole: {metrics}"
            time.sleep(0.1)


def test_completion_plain_and_streaming_equal_hf_greedy(served):
    server, _, model, tok = served
    oai = client(server.url)
    prompt = "The sky is"
    ref = tok.decode(hf_greedy(model, tok(prompt)["input_ids"], 8), skip_special_tokens=True)
    out = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    ids_prompt = tok("Hello world")["input_ids"]
    by_ids = oai.completions.create(model=MODEL, prompt=ids_prompt, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == tok.decode(hf_greedy(model, ids_prompt, 5), skip_special_tokens=True)


def test_chat_plain_and_streaming_use_the_chat_template(served):
    server, _, model, tok = served
    oai = client(server.url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    ref = tok.decode(hf_greedy(model, ids, 6), skip_special_tokens=True)
    out = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref
    assert out.usage.prompt_tokens == len(ids) and out.choices[0].finish_reason == "length"
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_repeats(served):
    server, _, _, _ = served
    oai = client(server.url)
    kw = dict(model=MODEL, prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True})
    first = oai.completions.create(seed=11, **kw).choices[0].text
    assert oai.completions.create(seed=11, **kw).choices[0].text == first
    assert {oai.completions.create(seed=s, **kw).choices[0].text for s in range(4)} != {first}


def test_stop_string_cuts_the_text(served):
    server, _, _, _ = served
    oai = client(server.url)
    greedy = oai.completions.create(model=MODEL, prompt="The grass", max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    stop = next(greedy[i:i + 2] for i in range(3, len(greedy) - 2) if "\ufffd" not in greedy[i:i + 2])
    cut = oai.completions.create(model=MODEL, prompt="The grass", max_tokens=16, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == greedy[:greedy.index(stop)]


def test_32_concurrent_clients_all_answered(served):
    server, _, _, _ = served

    async def run():
        oai = client(server.url, async_=True)
        calls = [oai.completions.create(model=MODEL, prompt=f"Hello {i}", max_tokens=3 + i % 5, temperature=0,
                                        extra_body={"ignore_eos": True}) for i in range(16)]
        calls += [oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Hi {i}"}],
                                              max_tokens=3 + i % 5, temperature=0.8, seed=i,
                                              extra_body={"ignore_eos": True}) for i in range(16)]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=300)

    outs = asyncio.run(run())
    assert len(outs) == 32
    assert [o.usage.completion_tokens for o in outs] == [3 + i % 5 for i in range(16)] * 2
    assert len({o.id for o in outs}) == 32
    pool_whole(server.url)


def _post(url, body, headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    with httpx.Client(trust_env=False, timeout=60) as http:
        return http.post(url, content=data, headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400, None, None),
    ("/v1/completions", b'[1, 2]', 400, None, None),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -3}, 400, "top_k", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "sparse_knobs": {"num_top_tokens": 64}}, 400,
     "sparse_knobs", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "sparse_knobs": {"no_such_knob": 1}}, 400,
     "sparse_knobs", None),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * (MAX_LEN + 10)}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 10, "max_tokens": MAX_LEN}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": [100000]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    ("/v1/nothing", {}, 404, None, None),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(served, path, body, status, param, code):
    server, _, _, _ = served
    response = _post(server.url + path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code
    ok = _post(server.url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_openai_client_raises_on_4xx(served):
    server, _, _, _ = served
    oai = client(server.url)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-2)


def test_disconnect_mid_stream_aborts_and_frees_the_pool(served):
    server, _, _, _ = served
    before = pool_whole(server.url)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": MAX_LEN - 10, "stream": True, "ignore_eos": True}
    with httpx.Client(trust_env=False, timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = 0
            for line in response.iter_lines():
                lines += bool(line.startswith("data: "))
                if lines == 3:
                    break
    after = pool_whole(server.url)
    assert after["sparse_hf_requests_aborted_total"] == before.get("sparse_hf_requests_aborted_total", 0) + 1


def test_models_health_metrics(served):
    server, _, _, _ = served
    with httpx.Client(trust_env=False) as http:
        assert http.get(server.url + "/health").json() == {"status": "ok"}
        metrics = http.get(server.url + "/metrics").text
    for name in ("sparse_hf_waiting", "sparse_hf_running", "sparse_hf_kv_usage", "sparse_hf_generation_tokens_total",
                 "sparse_hf_generation_tokens_per_s"):
        assert f"\n{name} " in "\n" + metrics
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_api_key_and_per_request_sparse_knobs():
    model, tok = tiny_chat_model(seed=1)
    llm = LLM(model, tok, max_model_len=MAX_LEN, max_num_seqs=4, num_kv_slots=2048, sparse_method="snapkv",
              num_top_tokens=16, num_recent_tokens=8, window_size=4)
    server = ServerThread(build_app(llm, MODEL, api_key="sekrit"))
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server.url, api_key="wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert _post(server.url + "/v1/completions", {"model": MODEL, "prompt": "hi"}).status_code == 401
        with httpx.Client(trust_env=False) as http:
            assert http.get(server.url + "/health").status_code == 200
        oai = client(server.url, api_key="sekrit")
        out = oai.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                     extra_body={"sparse_knobs": {"num_top_tokens": 16, "window_size": 4}})
        assert out.usage.completion_tokens <= 2
        with pytest.raises(openai.BadRequestError, match="num_top_tokens"):
            oai.completions.create(model=MODEL, prompt="hi", extra_body={"sparse_knobs": {"num_top_tokens": 99}})
    finally:
        server.stop()


# ---------------------------------------------------------------- `sparse-hf serve`

@pytest.mark.parametrize("argv, words", [
    (["serve"], "model"),
    (["serve", "x", "--port", "99999"], "port"),
    (["serve", "x", "--gpu-memory-utilization", "1.5"], "fraction"),
    (["serve", "x", "--max-num-seqs", "0"], "max-num-seqs"),
    (["serve", "/no/such/dir"], "does not exist"),
    (["serve", "DIR", "--sparse-knobs", "{bad"], "--sparse-knobs"),
    (["serve", "DIR", "--sparse-method", "nope"], "nope"),
    (["serve", "DIR", "--sparse-method", "snapkv", "--sparse-knobs", '{"no_such_knob": 1}'], "no_such_knob"),
    (["serve", "DIR", "--deltakv-prefill", "sideways"], "sideways"),
    (["serve", "DIR", "--sparse-method", "snapkv", "--deltakv-prefill", "layerwise"], "deltakv"),
    (["serve", "DIR", "--sparse-method", "snapkv", "--layerwise-hidden-on-host"], "deltakv"),
])
def test_serve_argument_errors_are_one_line_exit_2(argv, words, capsys, tiny_model_dir):
    from sparse_hf.cli import main
    argv = [tiny_model_dir if a == "DIR" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"), seed=2)


def test_serve_command_serves_and_stops(tiny_model_dir):
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "sparse_hf.engine.serve_cli", tiny_model_dir, "--port", str(port),
           "--max-model-len", "128", "--num-kv-slots", "1024", "--max-num-seqs", "4", "--served-model-name", MODEL,
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(trust_env=False) as http:
            wait_for_health(http, url, proc)
        out = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_return_token_ids_in_stream_and_whole(served):
    server, _, model, tok = served
    ids = tok("Hello world")["input_ids"]
    ref = hf_greedy(model, ids, 6)
    body = {"model": MODEL, "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = _post(server.url + "/v1/completions", body).json()
    assert whole["choices"][0]["token_ids"] == ref
    streamed = []
    with httpx.Client(trust_env=False, timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    for chunk in chunks:
        streamed += chunk["choices"][0]["token_ids"]
    assert streamed == ref and len(chunks) == 6       # one chunk per generated token


def test_bench_server_small(tmp_path):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"
    spec = importlib.util.spec_from_file_location("bench_server", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--small", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["path"], r["arrival"]) for r in rows) == [("http", "poisson 50.0/s"), ("http", "together"),
                                                               ("in-process", "poisson 50.0/s"),
                                                               ("in-process", "together")]
    for row in rows:   # 6 requests x 4 tokens each, all timed
        assert row["num_requests"] == 6 and row["output_tok_s"] * row["wall_s"] == pytest.approx(24, rel=0.1)
        assert row["ttft_s"]["p50"] > 0 and row["itl_ms"]["p50"] is not None


class _FailingSteps:
    """The real engine, except that ``step()`` raises while ``fail`` is set (before touching the engine)."""

    def __init__(self, llm):
        self._llm, self.fail = llm, False

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def step(self):
        if self.fail:
            raise RuntimeError("injected step failure")
        return self._llm.step()


def test_failed_step_fails_requests_in_flight_and_server_keeps_serving():
    model, tok = tiny_chat_model(seed=4)
    llm = _FailingSteps(LLM(model, tok, max_model_len=MAX_LEN, max_num_seqs=4, num_kv_slots=2048))
    server = ServerThread(build_app(llm, MODEL))
    try:
        llm.fail = True
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
        failed = _post(server.url + "/v1/completions", body)
        assert failed.status_code == 500 and "injected step failure" in failed.json()["error"]["message"]
        with httpx.Client(trust_env=False, timeout=60) as http:
            with http.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
                lines = [line for line in response.iter_lines() if line]
        assert "injected step failure" in lines[0] and lines[-1] == "data: [DONE]"
        llm.fail = False
        assert _post(server.url + "/v1/completions", body).json()["usage"]["completion_tokens"] == 4
        pool_whole(server.url)
    finally:
        server.stop()
