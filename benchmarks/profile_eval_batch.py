"""Where one ``sparse-hf eval --engine`` batch's time goes: the accuracy grid's batch, timed per prefill route.

    python benchmarks/profile_eval_batch.py                       # GPU: 32 x 2048 tokens, fp32, SmolLM2-135M shape
    python benchmarks/profile_eval_batch.py --rows 32 --length 8192 --routes gather,paged --kernels
    python benchmarks/profile_eval_batch.py --small               # CPU smoke run

Why: the fp32 accuracy grid ran at ~1,200 prompt tokens/s per eval process on the H200 (docs/benchmarks.md, run M),
with the GPU busy all the time. This runs one batch as :mod:`sparse_hf.eval.engine_runner` runs it (same
``engine_kwargs``, greedy, ``max_tokens`` per prompt), with random weights in SmolLM2-135M's shape (30 layers, 9 query
heads, 3 KV heads, head dim 64), once per prefill route of an fp32 pool (``attention.FP32_PREFILL_ROUTE``: ``gather``,
SDPA on gathered slots, the engine's choice now; ``paged``, the Triton kernel, its choice before), after one warm-up
batch. Prints one JSON line per route: engine construction, generate and close seconds, prompt tokens/s, steps by
kind. ``--kernels``: also the device time per kernel name of the timed batch (``torch.profiler``, top ``--top``).
``--method h2o --mass-backends auto,torch``: also per backend of H2O's prefill attention-mass pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import torch


def smollm2_config(small: bool):
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=16384,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def run_batch(model, method: str, knobs, prompts, max_new: int, device, profile: bool, top: int,
              mass_backend: str | None = None) -> dict:
    """One batch through the engine as the eval builds it; returns the timings (and the kernel table).
    ``mass_backend``: H2O's prefill mass backend (``None``: the engine's own)."""
    from sparse_hf.engine import LLM, SamplingParams
    from sparse_hf.eval.engine_runner import _StepCounter, _sync, engine_kwargs

    start = time.perf_counter()
    llm = LLM(model, None, dtype=model.dtype, device=device,
              **engine_kwargs(method, knobs, [len(p) for p in prompts], [max_new] * len(prompts), device))
    if mass_backend is not None:
        llm.runner.attention.mass_backend = mass_backend
    _sync(device)
    built = time.perf_counter()
    counter = _StepCounter(llm)
    params = [SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)] * len(prompts)
    prof = None
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities)
        prof.__enter__()
    with torch.inference_mode():
        llm.generate(prompts, params)
    _sync(device)
    if prof is not None:
        prof.__exit__(None, None, None)
    generated = time.perf_counter()
    route = llm.runner.attention.prefill_route
    llm.close()
    end = time.perf_counter()
    tokens = sum(len(p) for p in prompts)
    out = dict(route=route, rows=len(prompts), length=len(prompts[0]), build_s=round(built - start, 3),
               generate_s=round(generated - built, 3), close_s=round(end - generated, 3),
               prompt_tok_s=round(tokens / (end - start)), steps=dict(counter.steps))
    if prof is not None:
        # self time: a kernel's own device time (an op's self device time is ~0), so the sum counts nothing twice
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = prof.key_averages()
        rows = sorted(events, key=lambda e: -getattr(e, attr, 0))[:top]
        out["kernels"] = [dict(name=e.key[:80], calls=e.count, ms=round(getattr(e, attr, 0) / 1e3, 2)) for e in rows]
        out["self_ms_total"] = round(sum(getattr(e, attr, 0) for e in events) / 1e3, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32, help="prompts in the batch (the eval's MAX_ENGINE_ROWS)")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--method", default="full", help="full, or an engine method at --budget (the eval's rule)")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--routes", default="gather,paged", help="fp32 prefill routes to time (FP32_PREFILL_ROUTE)")
    p.add_argument("--kernels", action="store_true", help="a torch.profiler table of each timed batch")
    p.add_argument("--mass-backends", default=None,
                   help="h2o only: prefill mass backends to time per route, e.g. auto,torch (default: the engine's)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny model, 2 x 64 tokens")
    args = p.parse_args(argv)
    from transformers import LlamaForCausalLM

    from sparse_hf.engine import attention
    from sparse_hf.eval.runner import budget_to_cache_config

    device = torch.device("cpu" if args.small else "cuda")
    if args.small:
        args.rows, args.length, args.max_new = 2, 64, 4
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(args.small)).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, vocab, (args.length,)).tolist() for _ in range(args.rows)]
    knobs = budget_to_cache_config(args.method, args.budget, args.length)
    masses = args.mass_backends.split(",") if args.mass_backends else [None]
    if masses != [None] and args.method != "h2o":
        p.error("--mass-backends applies to --method h2o only")
    for route in args.routes.split(","):
        attention.FP32_PREFILL_ROUTE = route
        for mass in masses:
            run_batch(model, args.method, knobs, prompts[:2], args.max_new, device, False, args.top, mass)  # warm-up
            r = run_batch(model, args.method, knobs, prompts, args.max_new, device, args.kernels, args.top, mass)
            print(json.dumps(dict(method=args.method, dtype=args.dtype, fp32_prefill_route=route, mass_backend=mass,
                                  **r)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
