"""Time the decode selection's ordering: the full stable sort (``priority_order(prio)[..., :k]``) against a
``topk`` over the packed int64 keys (``priority_keys``), and check that both pick the same slots. ``top_priority``
(what ``select_keep``/``select_keep_static`` call) uses the sort on CUDA and the keys elsewhere, by these numbers.

Shapes are ``[B, H, L]`` priorities as the decode path builds them (candidates scored, sinks/recent ``inf``,
padding ``-inf``). On CUDA the times come from ``torch.cuda.Event`` (median of ``--iters`` after a warm-up); on CPU
from ``time.perf_counter``. Also times ``select_keep_static`` end to end with each ordering. One JSON line per case.

Example::

    python benchmarks/bench_selection_topk.py --device cuda --lengths 131072 --heads 28 --budget 0.1
    OMP_NUM_THREADS=1 python benchmarks/bench_selection_topk.py --device cpu --lengths 4096,32768 --heads 28
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparse_hf.methods import selection
from sparse_hf.methods.selection import priority_keys, priority_order, select_keep_static


def decode_priorities(B: int, H: int, L: int, sink: int, recent: int, dtype, device) -> torch.Tensor:
    """``[B, H, L]``: softmax-like candidate scores (with ties from rounding), ``inf`` for sinks/recent."""
    g = torch.Generator(device="cpu").manual_seed(0)
    scores = torch.softmax(torch.randn(B, H, L, generator=g) * 3, dim=-1).to(dtype).float()
    scores[..., :sink] = float("inf")
    scores[..., L - recent:] = float("inf")
    return scores.to(device=device, dtype=dtype)


def timed(fn, iters: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sort_prefix(prio: torch.Tensor, k: int) -> torch.Tensor:
    return priority_order(prio)[..., :min(int(k), prio.shape[-1])]


def keys_topk(prio: torch.Tensor, k: int) -> torch.Tensor:
    return priority_keys(prio).topk(min(int(k), prio.shape[-1]), dim=-1).indices


def bench_case(B: int, H: int, L: int, budget: float, dtype, device: str, iters: int, sink=8, recent=128) -> dict:
    k = sink + recent + int(budget * L)
    prio = decode_priorities(B, H, L, sink, recent, dtype, device)
    same = torch.equal(keys_topk(prio, k), sort_prefix(prio, k))
    row = {"device": device, "B": B, "heads": H, "candidates": L, "k": k, "dtype": str(dtype).split(".")[-1],
           "identical": same,
           "sort_ms": round(timed(lambda: sort_prefix(prio, k), iters, device), 4),
           "topk_ms": round(timed(lambda: keys_topk(prio, k), iters, device), 4)}
    # end to end, as OmniKV's observer calls it (float32 scores, per-row top counts)
    valid = torch.ones(B, H, L, dtype=torch.bool, device=device)
    scores = prio.float()
    top = torch.full((B,), int(budget * L), dtype=torch.long, device=device)
    original = selection.top_priority
    for name, fn in (("topk", keys_topk), ("sort", sort_prefix)):
        selection.top_priority = fn
        try:
            row[f"select_keep_static_{name}_ms"] = round(timed(
                lambda: select_keep_static(valid, scores, sink, recent, top, k), iters, device), 4)
        finally:
            selection.top_priority = original
    row["speedup"] = round(row["sort_ms"] / max(row["topk_ms"], 1e-9), 2)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="4096,32768,131072")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    for L in (int(x) for x in args.lengths.split(",")):
        for dtype in args.dtypes.split(","):
            print(json.dumps(bench_case(args.batch, args.heads, L, args.budget, getattr(torch, dtype), args.device,
                                        args.iters)), flush=True)


if __name__ == "__main__":
    main()
