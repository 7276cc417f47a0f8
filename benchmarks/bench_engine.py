"""The engine benchmark of issue 11: TTFT, decode tok/s, step ms against the bandwidth roofline, peak memory.

    python benchmarks/bench_engine.py [--cases 4096x8,32768x2,131072x1] [--methods vanilla,snapkv,omnikv]
                                      [--budget 2048] [--output bench_engine.json]
    python benchmarks/bench_engine.py --small          # CPU smoke run (CI)

Random weights in the Qwen2.5-7B shape (no download), bf16 on the GPU. One engine per method serves every case
(its pool sized for the longest). A case submits ``batch`` prompts of ``length`` random tokens at once and decodes
``--new-tokens`` each. The roofline step is (weights + the KV the batch holds) / the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
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
    if bandwidth and step:
        m = llm.model
        token_bytes = 2 * m.num_kv_heads * m.head_dim * llm.pool.k[0].element_size()   # one token, one layer
        floor = (weight_bytes + statistics.median(kv_held) * token_bytes) / bandwidth
        result.update(roofline_step_ms=round(floor * 1e3, 3), frac_of_roofline=round(floor / step, 3))
    return result


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
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, short cases")
    p.add_argument("--output", default=None, help="write the JSON here (default: stdout only)")
    args = p.parse_args(argv)
    extra = {}
    if args.small:
        args.shape, args.cases, args.new_tokens, args.budget, args.chunk_prefill_size = "tiny", "96x2,160x1", 4, 48, 64
        extra = dict(device="cpu", num_kv_slots=1024)
    cases = parse_cases(args.cases)
    config = engine_config(args.shape)
    longest = max(length for length, _ in cases)
    max_len = longest + args.new_tokens + 8
    device = torch.device(extra.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    bandwidth = copy_bandwidth(device)
    report = dict(shape=args.shape, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  copy_bw_TBps=round(bandwidth / 1e12, 3) if bandwidth else None, budget=args.budget, results=[])
    for method in args.methods.split(","):
        knobs = {} if method == "vanilla" else budget_config(method, args.budget / longest, longest,
                                                              config.num_hidden_layers)
        llm = LLM(config, max_model_len=max_len, max_num_seqs=max(b for _, b in cases),
                  max_num_batched_tokens=max(args.chunk_prefill_size, 2048), chunk_prefill_size=args.chunk_prefill_size,
                  gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                  sparse_method=None if method == "vanilla" else method, **knobs, **extra)
        weight_bytes = sum(t.numel() * t.element_size() for t in llm.model.parameters())
        run_case(llm, min(128, longest), 1, 4, None, weight_bytes)                    # warm-up: kernels, graphs
        for length, batch in cases:
            r = run_case(llm, length, batch, args.new_tokens, bandwidth, weight_bytes)
            r.update(method=method, knobs=knobs)
            report["results"].append(r)
            print(json.dumps(r), flush=True)
        llm.pool.check_whole()
        llm.close()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
