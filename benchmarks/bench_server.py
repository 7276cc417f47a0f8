"""The serving benchmark of issue 13 (section 4): a request mix sent over HTTP to the OpenAI server, against the
same mix through the engine in-process. Requests/s, output tok/s, TTFT and ITL percentiles.

    python benchmarks/bench_server.py [--num-requests 64] [--prompt-lens 1024:32768] [--new-tokens 256]
                                      [--arrivals together,poisson] [--rate 4] [--methods vanilla,snapkv]
                                      [--budget 2048] [--output bench_server.json]
    python benchmarks/bench_server.py --small          # CPU smoke run (CI)

Random weights in the Qwen2.5-7B shape (``bench_engine.engine_config``), bf16 on the GPU. Prompts are random
token ids of lengths uniform in ``--prompt-lens``; every request decodes ``--new-tokens`` (``ignore_eos``). The
arrivals are all at once, or a Poisson stream of ``--rate`` requests/s. Over HTTP, each request streams with
``return_token_ids`` so every token's arrival is timed at the client. Per method: the in-process runs first,
then the same engine behind ``build_app`` on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import engine_config  # noqa: E402

from sparse_hf.bench import budget_config  # noqa: E402
from sparse_hf.engine import LLM, SamplingParams  # noqa: E402


def request_mix(num: int, lo: int, hi: int, vocab: int, arrivals: str, rate: float, seed: int = 0):
    """``[(arrival_s, prompt_ids)]``: random prompts, arriving together or as a Poisson stream."""
    rng = random.Random(seed)
    t, mix = 0.0, []
    for _ in range(num):
        mix.append((t, [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]))
        if arrivals == "poisson":
            t += rng.expovariate(rate)
    return mix


def summarise(sent: list[float], token_times: list[list[float]]) -> dict:
    """Requests/s, output tok/s, TTFT and ITL percentiles (ms) from send times and per-token arrival times."""
    def pct(values, q):
        values = sorted(values)
        return round(1e3 * values[min(len(values) - 1, int(q * len(values)))], 2) if values else None
    start, end = min(sent), max(times[-1] for times in token_times)
    ttft = [times[0] - s for s, times in zip(sent, token_times)]
    itl = [b - a for times in token_times for a, b in zip(times, times[1:])]
    tokens = sum(len(times) for times in token_times)
    return dict(requests=len(sent), output_tokens=tokens,
                requests_per_s=round(len(sent) / (end - start), 3), output_tok_s=round(tokens / (end - start), 1),
                ttft_p50_ms=pct(ttft, 0.5), ttft_p90_ms=pct(ttft, 0.9), ttft_p99_ms=pct(ttft, 0.99),
                itl_p50_ms=pct(itl, 0.5), itl_p90_ms=pct(itl, 0.9), itl_p99_ms=pct(itl, 0.99),
                itl_mean_ms=round(1e3 * statistics.mean(itl), 2) if itl else None, duration_s=round(end - start, 2))


def run_in_process(llm, mix, new_tokens: int) -> dict:
    """Add each request at its arrival time and step the engine; a token's time is the end of its step."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    sent, token_times, pending = {}, {}, list(enumerate(mix))
    while pending or llm.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1][0] <= now:
            i, (_, ids) = pending.pop(0)
            llm.add_request(f"bench-{i}", ids, params)
            sent[i] = time.perf_counter()
            token_times[i] = []
        if not llm.has_unfinished_requests():
            time.sleep(max(0.0, min(0.01, pending[0][1][0] - now)))
            continue
        outputs = llm.step()
        t = time.perf_counter()
        for out in outputs:
            i = int(out.request_id.split("-")[1])
            token_times[i] += [t] * (len(out.token_ids) - len(token_times[i]))
    order = sorted(sent)
    return summarise([sent[i] for i in order], [token_times[i] for i in order])


async def _http_run(url: str, model: str, mix, new_tokens: int) -> dict:
    import httpx

    async def one(client, arrival, ids, start):
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        body = dict(model=model, prompt=ids, max_tokens=new_tokens, temperature=0, stream=True, ignore_eos=True,
                    return_token_ids=True)
        sent, times = time.perf_counter(), []
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    times += [time.perf_counter()] * len(chunk["choices"][0].get("token_ids", []))
        return sent, times

    limits = httpx.Limits(max_connections=len(mix) + 8)
    async with httpx.AsyncClient(trust_env=False, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, arrival, ids, start) for arrival, ids in mix))
    return summarise([s for s, _ in results], [t for _, t in results])


def run_over_http(llm, mixes: dict, new_tokens: int) -> dict:
    """Serve ``llm`` on 127.0.0.1 (uvicorn in a thread) and send each mix; returns ``{arrivals: summary}``."""
    import socket

    import uvicorn

    from sparse_hf.engine.server import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(llm, "bench"), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        return {name: asyncio.run(_http_run(url, "bench", mix, new_tokens)) for name, mix in mixes.items()}
    finally:
        server.should_exit = True
        thread.join(60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-lens", default="1024:32768", help="LO:HI, uniform")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--arrivals", default="together,poisson")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    p.add_argument("--methods", default="vanilla")
    p.add_argument("--budget", type=int, default=2048, help="KV tokens kept per layer by the sparse methods")
    p.add_argument("--chunk-prefill-size", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, few short requests")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    extra = {}
    if args.small:
        args.shape, args.num_requests, args.prompt_lens, args.new_tokens = "tiny", 6, "16:64", 4
        args.rate, args.budget, args.chunk_prefill_size = 50.0, 24, 64
        extra = dict(device="cpu", num_kv_slots=2048)
    lo, hi = (int(x) for x in args.prompt_lens.split(":"))
    config = engine_config(args.shape)
    mixes = {name: request_mix(args.num_requests, lo, hi, config.vocab_size, name, args.rate)
             for name in args.arrivals.split(",")}
    report = dict(shape=args.shape, num_requests=args.num_requests, prompt_lens=[lo, hi],
                  new_tokens=args.new_tokens, rate=args.rate, results=[])
    for method in args.methods.split(","):
        knobs = {} if method == "vanilla" else budget_config(method, args.budget / hi, hi, config.num_hidden_layers)
        llm = LLM(config, max_model_len=hi + args.new_tokens + 8, max_num_seqs=args.num_requests,
                  max_num_batched_tokens=max(args.chunk_prefill_size, 2048), chunk_prefill_size=args.chunk_prefill_size,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  sparse_method=None if method == "vanilla" else method, **knobs, **extra)
        run_in_process(llm, request_mix(2, 16, 32, config.vocab_size, "together", 1.0, seed=1), 2)   # warm-up
        rows = [dict(method=method, path="in-process", arrivals=name, **run_in_process(llm, mix, args.new_tokens))
                for name, mix in mixes.items()]
        rows += [dict(method=method, path="http", arrivals=name, **summary)
                 for name, summary in run_over_http(llm, mixes, args.new_tokens).items()]
        for row in rows:
            print(json.dumps(row), flush=True)
        report["results"] += rows
        llm.close()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
