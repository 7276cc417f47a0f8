"""Where an engine decode step's time goes: host phases, the GPU's own time, and Python hot spots.

    python benchmarks/profile_engine.py --case 131072x1 --method vanilla [--budget 2048] [--steps 40]
    python benchmarks/profile_engine.py --small            # CPU smoke run
    python benchmarks/profile_engine.py --case 4096x8 --kernels   # device time per kernel of an eager step
    python benchmarks/profile_engine.py --case 131072x1 --method omnikv --graph-kernels   # ... of a graph replay

For one case it prefills ``batch`` random prompts of ``length`` tokens (random weights, Qwen2.5-7B shape, bf16),
then measures over ``--steps`` decode steps:

- ``step_ms``: the wall time of ``LLM.step()`` as a user sees it (median over back-to-back steps);
- ``gpu_ms``: the GPU time of the decode step alone, from replaying the step's captured CUDA graph back to back
  (what the step would cost with zero host overhead);
- ``phases_ms``: host time of each phase of a step (schedule, slot allocation, staging the inputs, graph replay
  launch, sampling incl. its device sync, output processing), from wrappers around those calls;
- a cProfile table of the Python functions with the most own time over the steps.

With ``--kernels`` it instead builds the engine with ``enforce_eager=True`` and runs ``--steps`` decode steps under
``torch.profiler``: every kernel's device time, grouped by name (launches per step, microseconds per launch, share
of the step's kernel time) and by kind (GEMM, attention, norm, RoPE, elementwise, copy/index, ...), so a GPU run
shows where the step's GPU time goes. On the CPU (``--small``) the same table lists the aten ops' own CPU time.
With ``--graph-kernels`` (CUDA only) the engine keeps its CUDA graphs and the same table is taken over replays of
the last captured decode graph: the kernels as the step really runs them (graph widths, no launch gaps), to set
against the eager table when a graph step is slower than the eager kernels add up to.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
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


def latest_graph(graphs):
    """The last captured decode graph of a runner's graphs: ``DecodeGraphs`` keeps one per batch bucket
    (``graphs``, a dict), ``DeltaKVGraphs`` only its latest (``graph``); ``None`` when nothing was captured."""
    if graphs is None:
        return None
    if getattr(graphs, "graph", None) is not None:
        return graphs.graph
    captured = getattr(graphs, "graphs", None)
    return list(captured.values())[-1] if captured else None


def gpu_step_ms(llm, repeats: int = 30) -> float | None:
    """GPU time of the last captured decode graph, replayed ``repeats`` times back to back."""
    graph = latest_graph(getattr(llm.runner, "graphs", None))
    if graph is None or llm.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


#: Kernel kinds, first match wins (lower-cased kernel or op names).
KERNEL_KINDS = (
    ("gemm", r"gemm|gemv|cutlass|cublas|sm90_xmma|addmm|aten::mm|aten::bmm|aten::linear|matmul|splitk"),
    ("attention", r"sparse_decode|decode_scores|merge_splits|flash|attention|sdpa|fmha"),
    ("fused_norm", r"rms_norm|rmsnorm"),
    ("fused_rope", r"rope|rotary"),
    ("fused_silu", r"silu_mul|silu_and_mul"),
    ("kv_store", r"store_slots|append"),
    ("copy_index", r"copy|index|gather|scatter|cat|memcpy|memset|fill|arange"),
    ("reduce_sample", r"reduce|argmax|max|sum|mean|softmax|sort"),
    ("elementwise", r"elementwise|vectorized|unrolled|pow|rsqrt|mul|add|neg|silu|to_copy|aten::"),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def _device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, attr, None)
        if value:
            return float(value)
    return 0.0


def kernel_table(prof, steps: int, on_cuda: bool) -> dict:
    """Per-name rows ``{name, kind, per_step, us_each, ms_per_step, share}`` sorted by time (the top 40), plus
    totals by kind (over all rows).

    On CUDA the rows are the device kernels (and memcpy/memset); on the CPU the aten ops' self CPU time."""
    rows = []
    for evt in prof.key_averages():
        if on_cuda:
            is_device = str(getattr(evt, "device_type", "")).endswith("CUDA")
            total_us = _device_us(evt) if is_device else 0.0
        else:
            total_us = float(evt.self_cpu_time_total) if evt.key.startswith("aten::") else 0.0
        if total_us <= 0 or evt.count == 0:
            continue
        rows.append(dict(name=evt.key[:120], kind=kernel_kind(evt.key), per_step=round(evt.count / steps, 2),
                         us_each=round(total_us / evt.count, 2), ms_per_step=total_us / steps / 1e3))
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows) or 1.0
    kinds = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        r["share"] = round(r["ms_per_step"] / total, 4)
        kinds[r["kind"]][0] += r["ms_per_step"]
        kinds[r["kind"]][1] += r["per_step"]
        r["ms_per_step"] = round(r["ms_per_step"], 4)
    by_kind = {k: dict(ms_per_step=round(v[0], 4), launches_per_step=round(v[1], 1), share=round(v[0] / total, 4))
               for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])}
    return dict(kernel_ms_per_step=round(total, 4), launches_per_step=round(sum(r["per_step"] for r in rows), 1),
                by_kind=by_kind, kernels=rows[:40])


def profile_kernels(llm, steps: int, rows: int, header: dict) -> None:
    """Run ``steps`` eager decode steps under ``torch.profiler`` and print the kernel table (``KERNELS`` JSON)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = llm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            llm.step()
        if on_cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    table = kernel_table(prof, steps, on_cuda)
    print("KERNELS " + json.dumps(dict(header, eager_step_ms_profiled=round(wall, 3), **table)), flush=True)
    print(f"{'kernel':<90} {'kind':<13} {'/step':>6} {'us each':>9} {'ms/step':>8} {'share':>6}")
    for r in table["kernels"][:rows]:
        print(f"{r['name'][:90]:<90} {r['kind']:<13} {r['per_step']:>6} {r['us_each']:>9} {r['ms_per_step']:>8} "
              f"{r['share']:>6.1%}")


def profile_graph_kernels(llm, steps: int, rows: int, header: dict) -> None:
    """Replay the last captured decode graph ``steps`` times under ``torch.profiler`` and print its kernel table
    (``GRAPH_KERNELS`` JSON): CUPTI reports the kernels a graph launches one by one."""
    from torch.profiler import ProfilerActivity, profile

    graph = latest_graph(getattr(llm.runner, "graphs", None))
    if graph is None or llm.device.type != "cuda":
        raise SystemExit("profile_engine.py: error: --graph-kernels needs CUDA and a captured decode graph")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    table = kernel_table(prof, steps, True)
    print("GRAPH_KERNELS " + json.dumps(dict(header, gpu_ms=gpu_step_ms(llm), **table)), flush=True)
    print(f"{'kernel':<90} {'kind':<13} {'/step':>6} {'us each':>9} {'ms/step':>8} {'share':>6}")
    for r in table["kernels"][:rows]:
        print(f"{r['name'][:90]:<90} {r['kind']:<13} {r['per_step']:>6} {r['us_each']:>9} {r['ms_per_step']:>8} "
              f"{r['share']:>6.1%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="131072x1")
    p.add_argument("--method", default="vanilla")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--chunk-prefill-size", type=int, default=8192)
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, short case")
    p.add_argument("--rows", type=int, default=25, help="rows of the cProfile / kernel table")
    p.add_argument("--kernels", action="store_true",
                   help="device time per kernel of eager decode steps (torch.profiler) instead of the host profile")
    p.add_argument("--graph-kernels", action="store_true",
                   help="device time per kernel of the captured decode graph's replays (CUDA only)")
    p.add_argument("--no-decode-ahead", action="store_true", help="read each step's tokens before the next launch")
    p.add_argument("--skinny-gemm", action="store_true",
                   help="decode linears through the skinny Triton GEMM instead of cuBLAS (engine.model.SKINNY_GEMM)")
    args = p.parse_args(argv)
    if args.skinny_gemm:
        import sparse_hf.engine.model as engine_model
        engine_model.SKINNY_GEMM = True
    extra, shape = {}, "qwen2.5-7b"
    if args.small:
        shape, args.case, args.steps, args.budget, args.chunk_prefill_size = "tiny", "96x2", 6, 48, 64
        extra = dict(device="cpu", num_kv_slots=1024)
    (length, batch), = parse_cases(args.case)
    knobs = {} if args.method == "vanilla" else budget_config(args.method, args.budget / length, length)
    if args.method == "deltakv":                           # a random compressor of the usual shape (speed only)
        try:
            from bench_engine_deltakv import random_compressor
        except ImportError:                                 # run from the repository root
            from benchmarks.bench_engine_deltakv import random_compressor
        on_gpu = "device" not in extra and torch.cuda.is_available()
        if args.small:
            knobs["full_attn_layers"] = [0]
        knobs["compressor"] = random_compressor(engine_config(shape), torch.bfloat16 if on_gpu else torch.float32,
                                                torch.device("cuda" if on_gpu else "cpu"))
    llm = LLM(engine_config(shape), max_model_len=length + 3 * args.steps + 16, max_num_seqs=batch,
              max_num_batched_tokens=max(args.chunk_prefill_size, 2048), chunk_prefill_size=args.chunk_prefill_size,
              sparse_method=None if args.method == "vanilla" else args.method, enforce_eager=args.kernels,
              **knobs, **extra)
    llm.decode_ahead = llm.decode_ahead and not args.no_decode_ahead
    vocab = llm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=3 * args.steps + 8, ignore_eos=True)
    for i in range(batch):
        llm.add_request(f"r{i}", torch.randint(0, vocab, (length,), generator=g).tolist(), params)
    while not all(len(r.output_token_ids) >= 1 for r in llm.requests.values()):
        llm.step()                                                   # prefill (and graph capture below)
    for _ in range(3):
        llm.step()                                                   # warm-up decode steps: capture, compile
    if args.kernels:
        profile_kernels(llm, args.steps, args.rows, dict(case=args.case, method=args.method, device=str(llm.device)))
        llm.close()
        return 0
    if args.graph_kernels:
        profile_graph_kernels(llm, args.steps, args.rows, dict(case=args.case, method=args.method))
        llm.close()
        return 0

    def timed_steps(n: int) -> list[float]:
        """Wall time of each of ``n`` back-to-back steps (no sync between them: with decode-ahead a step's GPU work
        overlaps the previous step's host work, and a sync per step would hide that)."""
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            llm.step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    plain = timed_steps(args.steps)
    gpu = gpu_step_ms(llm)

    timer = PhaseTimer()
    timer.wrap(llm.scheduler, "schedule", "schedule")
    timer.wrap(llm.pool, "allocate", "pool.allocate")
    timer.wrap(llm.pool, "allocate_decode", "pool.allocate_decode")
    timer.wrap(llm.runner.inputs, "stage", "inputs.stage (pinned buffer + one async copy)")
    if llm.runner.graphs is not None:
        timer.wrap(llm.runner.graphs.inputs, "stage", "inputs.stage (pinned buffer + one async copy)")
        timer.wrap(llm.runner.graphs, "run", "graphs.run (slot copy + replay launch)")
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
    report = dict(case=args.case, method=args.method, knobs={k: v for k, v in knobs.items() if k != "compressor"}, skinny_gemm=args.skinny_gemm,
                  decode_ahead=llm.decode_ahead, device=str(llm.device),
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
