"""Where an HF-path ``+graph`` decode step's time goes: the host around the replay, the graph's GPU time, its kernels.

    python benchmarks/profile_hf_graph.py --case 131072x1 --methods snapkv+graph,deltakv+graph \
        --knob deltakv:kv_quant_bits=4 --knob deltakv:full_attn_layers=0,3,15,21

For each method it builds the bench's cache (``sparse_hf.bench._case_cache``, budget 0.1, Qwen2.5-7B shape, random
weights, bf16), prefills one random prompt, drives ``--steps`` decode steps through a :class:`GraphDecoder` as
``sparse-hf bench`` does (synced before and after each step) and reports, per method, one ``HF_GRAPH`` JSON line:

- ``step_ms``: the median wall time of a bench step (what ``decode_step_ms`` measures);
- ``replay_ms``: the median GPU time of the step's ``graph.replay()`` alone (device events around it);
- ``host_ms``: their difference (signature checks, the layers' maintenance, sampling and syncs);
- ``host_split_ms``: where a step's host time goes, from wall-clock stamps (medians): ``before`` the replay call (room
  check, signature, input copies; the device waits for these), the ``launch`` (the ``replay()`` call with its two
  event records), and ``after`` it until ``step`` returns (host counters, maintenance: these overlap the graph's
  device work unless they outlast it, i.e. unless ``launch + after`` nears ``replay_ms``);
- the kernels of 10 more steps under ``torch.profiler`` (the table of ``profile_engine.py``; CUPTI lists a graph's
  kernels one by one; eager work between replays, e.g. a flush, included), top ``--rows``.

CUDA only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@torch.inference_mode()
def profile_method(model, method: str, length: int, batch: int, budget: float, steps: int, overrides, rows: int):
    from graph_host_cost import median_ms
    from profile_engine import kernel_table
    from torch.profiler import ProfilerActivity, profile

    from sparse_hf.bench import _case_cache
    from sparse_hf.hf.cuda_graph import GraphDecoder

    dev = next(model.parameters()).device
    base = method.removesuffix("+graph")
    profiled = 10
    cache, _ = _case_cache(model, base, budget, length, steps + profiled + 8, overrides, graph=True)
    ids = torch.randint(100, model.config.vocab_size - 100, (batch, length), device=dev)
    token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(
        -1, keepdim=True)
    decoder = GraphDecoder(model, cache)
    replays = []
    stamps = []                          # per replayed step: step called, replay called, replay returned, step returned

    class TimedGraph:                    # the decoder's graph, its replays timed on the device
        def __init__(self, graph):
            self.graph = graph

        def replay(self):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            called = time.perf_counter()
            start.record()
            self.graph.replay()
            end.record()
            replays.append((start, end))
            stamps.append([called, time.perf_counter()])

    def run(i):
        if decoder.graph is not None and not isinstance(decoder.graph, TimedGraph):
            decoder.graph = TimedGraph(decoder.graph)
        pos = torch.full((batch, 1), length + i, device=dev, dtype=torch.long)
        replayed = len(stamps)
        t0 = time.perf_counter()
        logits = decoder.step(token, pos)
        if len(stamps) > replayed:
            stamps[-1] = [t0, *stamps[-1], time.perf_counter()]
        return logits.argmax(-1, keepdim=True).clone()

    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        token = run(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if not replays:
        raise SystemExit(f"{method}: no graph replay (captures={decoder.captures})")
    step_ms = statistics.median(times[6:]) * 1e3
    replay_ms = statistics.median(s.elapsed_time(e) for s, e in replays[-(steps - 8):])
    timed = [t for t in stamps[-(steps - 8):] if len(t) == 4]
    host_split = {name: round(statistics.median(t[k + 1] - t[k] for t in timed) * 1e3, 4)
                  for k, name in enumerate(("before", "launch", "after"))}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps, steps + profiled):
            token = run(i)
        torch.cuda.synchronize()
    table = kernel_table(prof, profiled, True)
    # the host parts of a step, each alone (no device work, no state change): what host_ms is made of
    first = decoder._signature()
    host_parts = {name: round(median_ms(fn, 50), 4) for name, fn in (
        ("signature", lambda: decoder._signature() == first), ("room", decoder._room),
        ("maintain", lambda: [cache.maintain_layer(i) for i in range(len(cache.layers))]))}
    print("HF_GRAPH " + json.dumps(dict(method=method, L=length, B=batch, step_ms=round(step_ms, 3),
                                        replay_ms=round(replay_ms, 3), host_ms=round(step_ms - replay_ms, 3),
                                        host_split_ms=host_split, host_parts_ms=host_parts,
                                        captures=decoder.captures, **table)), flush=True)
    print(f"{'kernel':<90} {'kind':<13} {'/step':>6} {'us each':>9} {'ms/step':>8} {'share':>6}")
    for r in table["kernels"][:rows]:
        print(f"{r['name'][:90]:<90} {r['kind']:<13} {r['per_step']:>6} {r['us_each']:>9} {r['ms_per_step']:>8} "
              f"{r['share']:>6.1%}")
    del decoder, cache


def main(argv=None) -> int:
    from sparse_hf.bench import build_model, parse_cases
    from sparse_hf.bench_cli import parse_knob

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-7b")
    p.add_argument("--case", default="131072x1")
    p.add_argument("--methods", default="snapkv+graph,deltakv+graph")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--knob", action="append", default=[], help="METHOD:KEY=VALUE, as for sparse-hf bench")
    args = p.parse_args(argv)
    (length, batch), = parse_cases(args.case)
    overrides = [parse_knob(k) for k in args.knob]
    model = build_model(args.model, torch.device("cuda"), torch.bfloat16)
    for method in args.methods.split(","):
        profile_method(model, method, length, batch, args.budget, args.steps, overrides, args.rows)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
