"""The serving benchmark of issue 13 (section 4): the engine issue's load test sent over HTTP to the OpenAI
server, beside the same load through the engine in-process (``bench_engine.run_load``).

    python benchmarks/bench_server.py [--load 64,1024,32768,256] [--rate 2] [--methods vanilla,snapkv]
                                      [--budget 2048] [--output bench_server.json]
    python benchmarks/bench_server.py --small          # CPU smoke run (CI)
    python benchmarks/bench_server.py --load 64,1024,8192,128 --arrivals together   # the H200 run (~2 minutes)

Random weights in the Qwen2.5-7B shape (``bench_engine.engine_config``), bf16 on the GPU. ``--load N,MIN,MAX,NEW``:
N prompts of random token ids with lengths uniform in [MIN, MAX], NEW output tokens each (``ignore_eos``),
arriving together and as a Poisson stream of ``--rate`` requests/s. Per method, one engine: first the in-process
runs, then the same engine behind ``build_app`` on 127.0.0.1, where every request streams with
``return_token_ids`` so each token's arrival is timed at the client. The HTTP mix draws its lengths and
arrivals from the same distributions as ``run_load`` (its own seeded draw, not the same prompts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import engine_config, percentiles, run_load  # noqa: E402

from sparse_hf.bench import budget_config  # noqa: E402
from sparse_hf.engine import LLM  # noqa: E402


def http_mix(num: int, lo: int, hi: int, vocab: int, rate: float | None, seed: int = 0):
    """``[(arrival_s, prompt_ids)]``: lengths uniform in ``[lo, hi]``, together or Poisson at ``rate``/s."""
    rng = random.Random(seed)
    t, mix = 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate) if rate else 0.0
        mix.append((t, [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]))
    return mix


async def _send_all(url: str, mix, new_tokens: int) -> tuple[list[float], list[float], int, float]:
    """Stream every request at its arrival time: ``(ttft_s, itl_s, tokens, wall_s)`` measured at the client."""
    import httpx

    ttft, itl, tokens = [], [], 0

    async def one(client, arrival, ids, start):
        nonlocal tokens
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        body = dict(model="bench", prompt=ids, max_tokens=new_tokens, temperature=0, stream=True, ignore_eos=True,
                    return_token_ids=True)
        last = time.perf_counter()
        first = True
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                for _ in chunk["choices"][0].get("token_ids", []):
                    now = time.perf_counter()
                    (ttft if first else itl).append(now - last)
                    first, last, tokens = False, now, tokens + 1

    limits = httpx.Limits(max_connections=len(mix) + 8)
    async with httpx.AsyncClient(trust_env=False, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, arrival, ids, start) for arrival, ids in mix))
    return ttft, itl, tokens, time.perf_counter() - start


def run_http_load(url: str, vocab: int, num: int, lo: int, hi: int, new_tokens: int, rate: float | None) -> dict:
    """The load test over HTTP, in ``run_load``'s report format."""
    ttft, itl, tokens, wall = asyncio.run(_send_all(url, http_mix(num, lo, hi, vocab, rate), new_tokens))
    return dict(num_requests=num, prompt_lens=[lo, hi], new_tokens=new_tokens,
                arrival="together" if rate is None else f"poisson {rate}/s", wall_s=round(wall, 3),
                requests_per_s=round(num / wall, 3), output_tok_s=round(tokens / wall, 1),
                ttft_s=percentiles(ttft), itl_ms=percentiles(itl, 1e3))


ARRIVALS = ("together", "poisson", "both")


class _Server:
    """``build_app(llm)`` under uvicorn on 127.0.0.1 and a free port, in a thread (a context manager)."""

    def __init__(self, llm):
        import uvicorn

        from sparse_hf.engine.server import build_app

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(llm, "bench"), log_level="warning", lifespan="on"))

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--load", default="64,1024,32768,256", metavar="N,MIN,MAX,NEW")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate (requests/s)")
    p.add_argument("--arrivals", choices=ARRIVALS, default="both",
                   help="run the load arriving together, as a Poisson stream of --rate/s, or both (each per path)")
    p.add_argument("--methods", default="vanilla")
    p.add_argument("--budget", type=int, default=2048, help="KV tokens kept per layer by the sparse methods")
    p.add_argument("--chunk-prefill-size", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, few short requests")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    extra = {}
    if args.small:
        args.shape, args.load, args.rate, args.budget, args.chunk_prefill_size = "tiny", "6,16,64,4", 50.0, 24, 64
        extra = dict(device="cpu", num_kv_slots=2048)
    num, lo, hi, new = (int(x) for x in args.load.split(","))
    config = engine_config(args.shape)
    rates = {"together": [None], "poisson": [args.rate], "both": [None, args.rate]}[args.arrivals]
    report = dict(shape=args.shape, load=[num, lo, hi, new], rates=rates, results=[])
    for method in args.methods.split(","):
        knobs = {} if method == "vanilla" else budget_config(method, args.budget / hi, hi)
        llm = LLM(config, max_model_len=hi + new + 8, max_num_seqs=num,
                  max_num_batched_tokens=max(args.chunk_prefill_size, 2048), chunk_prefill_size=args.chunk_prefill_size,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  sparse_method=None if method == "vanilla" else method, **knobs, **extra)
        run_load(llm, 2, 16, 32, 2, rate=None)                                           # warm-up
        rows = [dict(method=method, path="in-process", **run_load(llm, num, lo, hi, new, rate=rate))
                for rate in rates]
        with _Server(llm) as server:
            rows += [dict(method=method, path="http", **run_http_load(server.url, config.vocab_size, num, lo, hi, new,
                                                                       rate)) for rate in rates]
        for row in rows:
            print(json.dumps(row), flush=True)
        report["results"] += rows
        llm.close()
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
