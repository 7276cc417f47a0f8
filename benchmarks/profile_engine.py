"""Where an engine decode step's time goes: host phases, the GPU's own time, and Python hot spots.

    python benchmarks/profile_engine.py --case 131072x1 --method vanilla [--budget 2048] [--steps 40]
    python benchmarks/profile_engine.py --small            # CPU smoke run

For one case it prefills ``batch`` random prompts of ``length`` tokens (random weights, Qwen2.5-7B shape, bf16),
then measures over ``--steps`` decode steps:

- ``step_ms``: the wall time of ``LLM.step()`` as a user sees it (median);
- ``gpu_ms``: the GPU time of the decode step alone, from replaying the step's captured CUDA graph back to back
  (what the step would cost with zero host overhead);
- ``phases_ms``: host time of each phase of a step (schedule, plan, slot allocation, graph input copies + replay
  launch, sampling incl. its device sync, output processing), from wrappers around those calls;
- a cProfile table of the Python functions with the most own time over the steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections import defaultdict

import torch

from sparse_hf.bench import budget_config, parse_cases
from sparse_hf.engine import LLM, SamplingParams

try:
    from bench_engine import engine_config
except ImportError:                                         # run from the repository root
    from benchmarks.bench_engine import engine_config


class PhaseTimer:
    """Wraps ``obj.name`` so that each call adds its host wall time to ``self.ms[label]``."""

    def __init__(self):
        self.ms = defaultdict(list)

    def wrap(self, obj, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.ms[label].append((time.perf_counter() - t0) * 1e3)

        setattr(obj, name, timed)


def gpu_step_ms(llm, repeats: int = 30) -> float | None:
    """GPU time of the last captured decode graph, replayed ``repeats`` times back to back."""
    graphs = getattr(llm.runner, "graphs", None)
    if graphs is None or not graphs.graphs or llm.device.type != "cuda":
        return None
    graph = list(graphs.graphs.values())[-1]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="131072x1")
    p.add_argument("--method", default="vanilla")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--chunk-prefill-size", type=int, default=8192)
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, short case")
    p.add_argument("--rows", type=int, default=25, help="rows of the cProfile table")
    args = p.parse_args(argv)
    extra, shape = {}, "qwen2.5-7b"
    if args.small:
        shape, args.case, args.steps, args.budget, args.chunk_prefill_size = "tiny", "96x2", 6, 48, 64
        extra = dict(device="cpu", num_kv_slots=1024)
    (length, batch), = parse_cases(args.case)
    knobs = {} if args.method == "vanilla" else budget_config(args.method, args.budget / length, length)
    llm = LLM(engine_config(shape), max_model_len=length + 3 * args.steps + 16, max_num_seqs=batch,
              max_num_batched_tokens=max(args.chunk_prefill_size, 2048), chunk_prefill_size=args.chunk_prefill_size,
              sparse_method=None if args.method == "vanilla" else args.method, **knobs, **extra)
    vocab = llm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=3 * args.steps + 8, ignore_eos=True)
    for i in range(batch):
        llm.add_request(f"r{i}", torch.randint(0, vocab, (length,), generator=g).tolist(), params)
    while not all(len(r.output_token_ids) >= 1 for r in llm.requests.values()):
        llm.step()                                                   # prefill (and graph capture below)
    for _ in range(3):
        llm.step()                                                   # warm-up decode steps: capture, compile

    def timed_steps(n: int) -> list[float]:
        out = []
        for _ in range(n):
            if llm.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    plain = timed_steps(args.steps)
    gpu = gpu_step_ms(llm)

    timer = PhaseTimer()
    timer.wrap(llm.scheduler, "schedule", "schedule")
    timer.wrap(llm.pool, "allocate", "pool.allocate")
    if llm.runner.graphs is not None:
        timer.wrap(llm.runner.graphs, "run", "graphs.run (copies + replay launch + logits clone)")
    timer.wrap(llm.runner, "decode", "runner.decode (all of the forward step)")
    timer.wrap(llm, "sampler", "sampler (incl. device sync)")
    timer.wrap(llm.output_processor, "update", "output update (per request)")
    wrapped = timed_steps(args.steps)

    prof = cProfile.Profile()
    prof.enable()
    timed_steps(args.steps)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.rows)

    phases = {label: round(statistics.median(v), 3) for label, v in timer.ms.items()}
    calls = {label: round(len(v) / args.steps, 2) for label, v in timer.ms.items()}
    report = dict(case=args.case, method=args.method, knobs=knobs, device=str(llm.device),
                  step_ms=round(statistics.median(plain), 3), step_ms_instrumented=round(statistics.median(wrapped), 3),
                  gpu_ms=round(gpu, 3) if gpu else None,
                  host_overhead_ms=round(statistics.median(plain) - gpu, 3) if gpu else None,
                  phases_ms=phases, phase_calls_per_step=calls)
    print("PROFILE " + json.dumps(report), flush=True)
    print(text.getvalue())
    llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
