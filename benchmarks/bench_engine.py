"""The engine benchmark of issue 11: TTFT, decode tok/s, step ms against the bandwidth roofline, peak memory.

    python benchmarks/bench_engine.py [--cases 4096x8,32768x2,131072x1] [--methods vanilla,snapkv,omnikv]
                                      [--budget 2048] [--output bench_engine.json]
    python benchmarks/bench_engine.py --load 64,1024,32768,256 --rate 2   # plus the load test
    python benchmarks/bench_engine.py --load 64,1024,32768,256 --load-hf --load-hf-max-s 240   # and HF generate
    python benchmarks/bench_engine.py --cases 262144x1 --methods vanilla,snapkv --budget 2048 --new-tokens 32
    python benchmarks/bench_engine.py --hf-methods vanilla,hf-best,snapkv+graph   # our HF path in the same process
    python benchmarks/bench_engine.py --small          # CPU smoke run (CI)

Random weights in the Qwen2.5-7B shape (no download), bf16 on the GPU. One engine per method serves every case
(its pool sized for the longest). A case submits ``batch`` prompts of ``length`` random tokens at once and decodes
``--new-tokens`` each. The roofline step is (weights + the KV the batch holds) / the measured copy bandwidth.
The load test runs with mixed steps (decode rows riding along with prompt chunks) and without, on the same engine
(``--load-mixed``), so its ITL percentiles show what mixing buys.
Every row is printed and the ``--output`` JSON rewritten as soon as it exists: a run killed mid-way keeps what
finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from sparse_hf.bench import SHAPES, budget_config, copy_bandwidth, parse_cases
from sparse_hf.engine import LLM, SamplingParams


def engine_config(shape: str):
    from transformers import AutoConfig

    knobs = dict(SHAPES[shape])
    return AutoConfig.for_model(knobs.pop("model_type"), **knobs)


def run_case(llm, length: int, batch: int, new_tokens: int, bandwidth: float | None, weight_bytes: int) -> dict:
    """Submit ``batch`` prompts of ``length`` tokens together; time the prefill and every decode step."""
    g = torch.Generator().manual_seed(length + batch)
    vocab = llm.model.config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        llm.add_request(f"{length}x{batch}-{i}", torch.randint(0, vocab, (length,), generator=g).tolist(), params)
    cuda = llm.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(llm.device)
    start = time.perf_counter()
    ttft, decode_steps, kv_held = {}, [], []
    finished = 0
    while finished < batch:
        t0 = time.perf_counter()
        outs = llm.step()
        dt = time.perf_counter() - t0
        for o in outs:
            ttft.setdefault(o.request_id, time.perf_counter() - start)
        if outs and len(outs) == batch - finished and all(len(o.token_ids) > 1 for o in outs):
            decode_steps.append(dt)                          # a decode step of every unfinished row
            kv_held.append(llm.pool.used_slots())
        finished += sum(o.finished for o in outs)
    total = time.perf_counter() - start
    step = statistics.median(decode_steps) if decode_steps else None
    result = dict(length=length, batch=batch, new_tokens=new_tokens,
                  ttft_s=round(statistics.mean(ttft.values()), 4), ttft_max_s=round(max(ttft.values()), 4),
                  decode_tok_s=round(batch / step, 1) if step else None,
                  step_ms=round(step * 1e3, 3) if step else None, total_s=round(total, 3))
    if cuda:
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(llm.device) / 2**30, 2)
        held = weight_bytes + sum(t.numel() * t.element_size() for t in llm.pool.k + llm.pool.v)
        result["peak_beyond_weights_kv_gib"] = round((torch.cuda.max_memory_allocated(llm.device) - held) / 2**30, 2)
    if bandwidth and step:
        m = llm.model
        token_bytes = 2 * m.num_kv_heads * m.head_dim * llm.pool.k[0].element_size()   # one token, one layer
        floor = (weight_bytes + statistics.median(kv_held) * token_bytes) / bandwidth
        result.update(roofline_step_ms=round(floor * 1e3, 3), frac_of_roofline=round(floor / step, 3))
    return result


def percentiles(values: list[float], scale: float = 1.0) -> dict:
    """p50 / p90 / p99 of ``values`` (times ``scale``), or ``None``s when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 3)  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def load_requests(num_requests: int, min_len: int, max_len: int, vocab: int, rate: float | None):
    """The load test's requests: ``(arrival times in s, prompts)``, ``num_requests`` prompts of uniform random
    lengths in ``[min_len, max_len]`` arriving together (``rate=None``) or as a Poisson stream of ``rate``/s. The same
    arguments give the same requests (the engine and HF ``generate`` serve the same load)."""
    g = torch.Generator().manual_seed(num_requests)
    lengths = torch.randint(min_len, max_len + 1, (num_requests,), generator=g).tolist()
    gaps = (torch.empty(num_requests).exponential_(generator=g) / rate).tolist() if rate else [0.0] * num_requests
    arrivals = [sum(gaps[: i + 1]) for i in range(num_requests)]
    return arrivals, [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run_load(llm, num_requests: int, min_len: int, max_len: int, new_tokens: int, rate: float | None,
             first: int | None = None) -> dict:
    """``num_requests`` prompts of uniform random lengths in ``[min_len, max_len]``, arriving together
    (``rate=None``) or as a Poisson stream of ``rate`` requests/s: requests/s, output tok/s, TTFT and
    inter-token latency percentiles. ``first``: serve only the load's first ``first`` requests (those HF ``generate``
    finished within its time cap, for a ratio over the same requests)."""
    arrivals, prompts = load_requests(num_requests, min_len, max_len, llm.model.config.vocab_size, rate)
    if first is not None:
        arrivals, prompts, num_requests = arrivals[:first], prompts[:first], min(first, num_requests)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    added, finished, last_token, ttft, itl, tokens, max_running = 0, 0, {}, [], [], 0, 0
    while finished < num_requests:
        now = time.perf_counter() - start
        while added < num_requests and arrivals[added] <= now:
            llm.add_request(f"load-{added}", prompts[added], params)
            last_token[f"load-{added}"] = start + arrivals[added]
            added += 1
        if not llm.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, arrivals[added] - now)))
            continue
        outs = llm.step()
        t = time.perf_counter()
        max_running = max(max_running, len(llm.scheduler.running))
        for o in outs:
            if o.finish_reason == "abort":
                continue
            (ttft if len(o.token_ids) == 1 else itl).append(t - last_token[o.request_id])
            last_token[o.request_id] = t
            tokens += 1
            finished += o.finished
    wall = time.perf_counter() - start
    return dict(num_requests=num_requests, prompt_lens=[min_len, max_len], new_tokens=new_tokens,
                arrival="together" if rate is None else f"poisson {rate}/s", wall_s=round(wall, 3),
                requests_per_s=round(num_requests / wall, 3), output_tok_s=round(tokens / wall, 1),
                ttft_s=percentiles(ttft), itl_ms=percentiles(itl, 1e3), max_running=max_running)


def rows_that_fit(llm, prompt_len: int, new_tokens: int, kept: int | None) -> int:
    """Requests of ``prompt_len`` + ``new_tokens`` the pool holds at once, from its size (``max_num_seqs``, the rows
    the engine was built with, caps what it runs at once; reported beside). Vanilla: every row holds its whole
    context. An eviction method (``kept`` tokens per row after the prompt): one prompt at a time holds all its
    slots until its eviction, the others ``kept + new_tokens``. The tightest slot group (per-layer budgets) decides."""
    slots = min(llm.pool.group_slots)
    if kept is None:
        fit = slots // (prompt_len + new_tokens)
    else:
        fit = 0 if slots < prompt_len else 1 + (slots - prompt_len) // (kept + new_tokens)
    return fit


def run_hf_load(shape: str, load: list[int], device, batch: int = 8, max_s: float | None = None,
                on_batch=None) -> dict:
    """The load test's requests (arriving together) through HF ``generate`` (vanilla ``DynamicCache``, SDPA),
    ``batch`` requests at a time in arrival order, left-padded: what serving them with plain Transformers gives.
    Run before any engine is built (one process, one table).

    ``max_s``: a batch starts only while the elapsed time plus the slowest finished batch's stays within it (the
    first always runs), so the HF side ends near ``max_s`` and leaves a device call room for the engine (run O: 64
    requests of 1K-32K prompts were killed at 330 s, mid-load, with nothing written). Output tok/s and requests/s
    are over the batches that finished (``batches_done`` of ``batches_total``, the first ``requests_done``
    requests). ``on_batch(summary)`` gets the running summary after every batch (same keys as the return)."""
    from sparse_hf.bench import build_model

    num_requests, min_len, max_len, new_tokens = load
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(shape, device, dtype)
    _, prompts = load_requests(num_requests, min_len, max_len, model.config.vocab_size, None)
    groups = [prompts[first: first + batch] for first in range(0, num_requests, batch)]
    tokens, done, slowest, start = 0, 0, 0.0, time.perf_counter()
    summary = {}
    for index, group in enumerate(groups):
        if index and max_s is not None and time.perf_counter() - start + slowest > max_s:
            break
        began = time.perf_counter()
        width = max(len(p) for p in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, p in enumerate(group):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens += (out.shape[1] - width) * len(group)
        done += len(group)
        slowest = max(slowest, time.perf_counter() - began)
        wall = time.perf_counter() - start
        summary = dict(path="hf generate", batch=batch, num_requests=num_requests, prompt_lens=[min_len, max_len],
                       new_tokens=new_tokens, arrival="together", max_s=max_s, batches_done=index + 1,
                       batches_total=len(groups), requests_done=done, output_tokens=tokens, wall_s=round(wall, 3),
                       requests_per_s=round(done / wall, 3), output_tok_s=round(tokens / wall, 1))
        if on_batch is not None:
            on_batch(summary)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def engine_vs_hf(llm, load: list[int], hf: dict, together: dict) -> dict:
    """The engine's output tok/s and requests/s over HF ``generate``'s, over the same requests: the engine's
    together-arriving run when HF finished the whole load, otherwise a further engine run over the requests HF
    finished (``hf["requests_done"]``, the load's first ones)."""
    same = together if hf["requests_done"] == together["num_requests"] else \
        run_load(llm, *load, rate=None, first=hf["requests_done"])
    return dict(requests=same["num_requests"], same_requests=True, engine_output_tok_s=same["output_tok_s"],
                hf_output_tok_s=hf["output_tok_s"], engine_requests_per_s=same["requests_per_s"],
                hf_requests_per_s=hf["requests_per_s"],
                output_tok_s_x_hf=round(same["output_tok_s"] / hf["output_tok_s"], 2),
                requests_per_s_x_hf=round(same["requests_per_s"] / hf["requests_per_s"], 2))


def run_hf_side(shape: str, methods: str, cases, budget: int, new_tokens: int, device, bandwidth,
                on_result=None) -> list[dict]:
    """The same cases through ``sparse-hf bench``'s ``run_case`` (HF ``generate``'s per-step path: HF vanilla,
    HF's best, our HF caches), before any engine is built, so each table is one process. The HF model is freed
    afterwards (an engine sizes its pool from the free memory). Sparse methods keep ``budget`` tokens per prompt.
    ``on_result(row)`` gets each row as soon as it exists (default: print it)."""
    from sparse_hf.bench import BASELINES, build_model, check_methods, warm_up
    from sparse_hf.bench import run_case as hf_run_case

    names = check_methods(methods, device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(shape, device, dtype)
    fraction = lambda length: min(1.0, budget / length)  # noqa: E731
    warm_up(model, device, names, [b for _, b in cases], fraction(512), bandwidth)
    results = []
    for length, batch in cases:
        for name in names:
            r = hf_run_case(model, device, length, batch, name, None if name in BASELINES else fraction(length),
                            new_tokens, bandwidth)
            r.update(path="hf")
            results.append(r)
            (on_result or (lambda row: print(json.dumps(row), flush=True)))(r)
    del model
    import gc

    torch._dynamo.reset()          # hf-best's compiled graphs hold the HF model's weights (15 GB for the 7B shape):
    gc.collect()                   # run L's engine rows counted them as "peak beyond weights + KV" before this
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    p.add_argument("--cases", default="4096x8,32768x2,131072x1")
    p.add_argument("--methods", default="vanilla,snapkv,omnikv")
    p.add_argument("--budget", type=int, default=2048, help="KV tokens kept per layer by the sparse methods")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunk-prefill-size", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks splitting the heads (one GPU each)")
    p.add_argument("--tp-selection", default="exact", choices=["exact", "per_rank"],
                   help="with --tensor-parallel-size > 1: all-reduce selection scores (exact) or select per rank")
    p.add_argument("--load", default=None, metavar="N,MIN,MAX,NEW",
                   help="also a load test: N requests, prompt lengths MIN..MAX, NEW output tokens each, arriving "
                        "together and as a Poisson stream (e.g. 64,1024,32768,256)")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate of the load test (requests/s)")
    p.add_argument("--prefill-route", default=None,
                   help="how prompt chunks attend: paged, split, gather, or a comma list to run the cases under each "
                        "(default: the engine's choice; see PoolAttention._prefill)")
    p.add_argument("--load-arrivals", default="together,poisson", help="which load arrivals to run (comma list)")
    p.add_argument("--load-mixed", default="on,off", help="load test with mixed steps on, off, or both (comma list)")
    p.add_argument("--load-hf", action="store_true",
                   help="also serve the load test's requests (arriving together) with HF generate, 8 at a time, first")
    p.add_argument("--load-hf-max-s", type=float, default=240.0,
                   help="HF generate's time cap: no batch starts that the slowest so far says would end past it; "
                        "rates are over the batches done (default: %(default)s, room for the engine in a 10-min call)")
    p.add_argument("--load-hf-batch", type=int, default=8, help="requests per HF generate call (default: 8)")
    p.add_argument("--hf-methods", default="",
                   help="also run these through our HF path in the same process first, side by side with the engine "
                        "(comma list: vanilla, hf-best, or a sparse method, +graph on CUDA; e.g. "
                        "vanilla,hf-best,snapkv+graph); sparse ones keep --budget tokens of each prompt")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, short cases")
    p.add_argument("--output", default=None, help="write the JSON here (default: stdout only)")
    args = p.parse_args(argv)
    extra = {}
    if args.prefill_route and not set(args.prefill_route.split(",")) <= {"paged", "split", "gather"}:
        p.error(f"--prefill-route {args.prefill_route!r}: expected a comma list of paged, split, gather")
    if args.small:
        args.shape, args.cases, args.new_tokens, args.budget, args.chunk_prefill_size = "tiny", "96x2,160x1", 4, 48, 64
        args.load = "6,16,64,4"
        extra = dict(device="cpu", num_kv_slots=1024)
    cases = parse_cases(args.cases)
    config = engine_config(args.shape)
    load = [int(x) for x in args.load.split(",")] if args.load else None
    if load is not None and (len(load) != 4 or min(load) < 1 or load[1] > load[2]):
        p.error(f"--load {args.load!r}: expected N,MIN,MAX,NEW with 1 <= MIN <= MAX")
    if not set(args.load_arrivals.split(",")) <= {"together", "poisson"} or \
            not set(args.load_mixed.split(",")) <= {"on", "off"}:
        p.error(f"--load-arrivals {args.load_arrivals!r} / --load-mixed {args.load_mixed!r}: expected comma lists "
                "of together,poisson / on,off")
    longest = max([length for length, _ in cases] + ([load[2]] if load else []))
    max_len = longest + args.new_tokens + 8
    device = torch.device(extra.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    bandwidth = copy_bandwidth(device)
    report = dict(shape=args.shape, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  copy_bw_TBps=round(bandwidth / 1e12, 3) if bandwidth else None, budget=args.budget, results=[])

    def save():                    # after every result: a run killed mid-way keeps what finished
        if args.output:
            with open(args.output + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(args.output + ".tmp", args.output)

    def emit(row: dict, key: str | None = None):
        """Print ``row`` and save the report, after appending ``row`` to ``report[key]`` when given."""
        if key is not None:
            report.setdefault(key, []).append(row)
        print(json.dumps(row), flush=True)
        save()

    def hf_progress(summary: dict):
        report["load_hf"] = summary
        emit(summary)

    if args.load_hf:
        if load is None:
            p.error("--load-hf needs --load N,MIN,MAX,NEW")
        run_hf_load(args.shape, load, device, batch=args.load_hf_batch, max_s=args.load_hf_max_s,
                    on_batch=hf_progress)
    if args.hf_methods:
        run_hf_side(args.shape, args.hf_methods, cases, args.budget, args.new_tokens, device, bandwidth,
                    on_result=lambda row: emit(row, "hf"))
    for method in args.methods.split(","):
        knobs = {} if method == "vanilla" else budget_config(method, args.budget / longest, longest)
        llm = LLM(config, max_model_len=max_len, max_num_seqs=max([b for _, b in cases] + ([load[0]] if load else [])),
                  max_num_batched_tokens=max(args.chunk_prefill_size, 2048), chunk_prefill_size=args.chunk_prefill_size,
                  gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                  tensor_parallel_size=args.tensor_parallel_size, tp_selection=args.tp_selection,
                  sparse_method=None if method == "vanilla" else method, **knobs, **extra)
        weight_bytes = sum(t.numel() * t.element_size() for t in llm.model.parameters())
        for batch in sorted({b for _, b in cases}):       # warm-up: kernels and graphs of each batch size
            run_case(llm, min(128, longest), batch, 4, None, weight_bytes)
        routes = args.prefill_route.split(",") if args.prefill_route else [llm.runner.attention.prefill_route]
        for route, (length, batch) in [(route, case) for route in routes for case in cases]:
            llm.runner.attention.prefill_route = route
            r = run_case(llm, length, batch, args.new_tokens, bandwidth, weight_bytes)
            r.update(method=method, knobs=knobs, prefill_route=llm.runner.attention.prefill_route)
            emit(r, "results")
        if load is not None:
            kept = None if method == "vanilla" or llm.runner.method.family == "mask" else args.budget
            emit(dict(method=method, pool_slots_per_layer=min(llm.pool.group_slots), prompt_len=load[2],
                      new_tokens=load[3], rows_that_fit=rows_that_fit(llm, load[2], load[3], kept),
                      max_num_seqs=llm.config.max_num_seqs), "capacity")
            for mixed in args.load_mixed.split(","):
                llm.config.mixed_steps = mixed == "on"                 # the scheduler reads it every step
                for arrival in args.load_arrivals.split(","):
                    r = run_load(llm, *load, rate=None if arrival == "together" else args.rate)
                    r.update(method=method, knobs=knobs, mixed_steps=mixed == "on")
                    emit(r, "load")
                    if arrival == "together" and "load_hf" in report:    # the side-by-side, same requests
                        emit(dict(method=method, mixed_steps=mixed == "on",
                                  **engine_vs_hf(llm, load, report["load_hf"], r)), "load_vs_hf")
        llm.check_pool_whole()
        llm.close()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
