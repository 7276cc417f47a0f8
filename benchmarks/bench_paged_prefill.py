"""Micro-benchmark of prefill attention over the KV pool: the paged Triton kernel against SDPA on gathered K/V.

    python benchmarks/bench_paged_prefill.py [--context 131072] [--chunk 8192] [--output out.json]
    python benchmarks/bench_paged_prefill.py --dtype float32 --heads 9,3,64 --context 8192 --chunk 2048 --skip-whole

Default: Qwen2.5-7B head shape (28 query heads, 4 KV heads, head dim 128), bf16, one layer; ``--heads H,HKV,D`` and
``--dtype`` change them (the second line: SmolLM2-135M in fp32, the accuracy grid's engine prefill, where the engine
now takes ``sdpa gathered`` instead of the paged kernel: ``attention.FP32_PREFILL_ROUTE``). Prints JSON lines:

- ``last_chunk``: the chunk of ``--chunk`` queries at the end of ``--context`` keys (lower-right causal): the
  Triton kernel for each of its configurations, with the row's slots contiguous (a fresh pool) and shuffled (a
  pool after churn); SDPA on the gathered slots as the engine ran it before (gather included), and per SDPA
  backend. Time and TFLOP/s (4 * D * H per visible query-key pair).
- ``whole_prompt``: all attention of one layer of a ``--context`` prompt: the kernel over every chunk in turn
  against one causal SDPA over the whole prompt (what HF runs), per SDPA backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_hf.engine import sdpa_split
from sparse_hf.engine.attention import chunk_attention
from sparse_hf.kernels.sdpa_split import split_chunk_attention
from sparse_hf.kernels.paged_prefill import CONFIGS, launch_config, paged_prefill_attention, prefill_tiles

H, HKV, D = 28, 4, 128
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, reps: int = 3) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def pairs(n: int, context: int) -> int:
    """Visible query-key pairs of a chunk of ``n`` queries at the end of ``context`` keys."""
    return n * (context - n) + n * (n + 1) // 2


def row(kind: str, name: str, seconds: float | None, n_pairs: int, **extra) -> dict:
    r = dict(kind=kind, name=name, ms=None if seconds is None else round(seconds * 1e3, 3),
             tflops=None if seconds is None else round(4 * D * H * n_pairs / seconds / 1e12, 1), **extra)
    print(json.dumps(r), flush=True)
    return r


def use_split_kernel(op: str) -> None:
    """Make the engine's split route use SDPA kernel ``op`` only (``"cudnn"`` or ``"flash"``; KV heads repeated
    where the kernel refuses GQA)."""
    sdpa_split.KERNELS = (op,)
    sdpa_split.ALLOW_REPEAT = True
    sdpa_split._working.clear()


def per_backend(kind: str, name: str, fn, n_pairs: int, reps: int) -> list[dict]:
    """``fn`` timed under each SDPA backend alone (``None`` where that backend cannot run it)."""
    rows = []
    for backend_name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                t = timed(fn, reps)
        except Exception as e:
            t = None
            print(json.dumps(dict(kind="error", backend=backend_name, error=str(e)[:200])), flush=True)
        rows.append(row(kind, f"{name} {backend_name}", t, n_pairs))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--skip-whole", action="store_true", help="only the last-chunk table")
    p.add_argument("--output", default=None)
    p.add_argument("--small", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1 (tiny sizes)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--heads", default=None, help="H,HKV,D: query heads, KV heads, head dim (default 28,4,128)")
    args = p.parse_args(argv)
    global H, HKV, D
    if args.heads:
        H, HKV, D = (int(x) for x in args.heads.split(","))
    dev, dt = torch.device("cuda"), getattr(torch, args.dtype)
    if args.small:
        dev, dt, args.context, args.chunk = torch.device("cpu"), torch.float32, 48, 16
    L, n = args.context, args.chunk
    torch.manual_seed(0)
    k_pool = torch.randn(L + 64, HKV, D, device=dev, dtype=dt)
    v_pool = torch.randn(L + 64, HKV, D, device=dev, dtype=dt)
    contiguous = torch.arange(L, device=dev, dtype=torch.int32).view(1, L)
    shuffled = torch.randperm(L + 64, device=dev)[:L].to(torch.int32).view(1, L)
    q = torch.randn(L, H, D, device=dev, dtype=dt)
    scale = D ** -0.5
    results = []
    seg = [(0, 0, n, L)]
    qc = q[:n]
    # Correctness at this shape, against SDPA on the gathered slots.
    slots = shuffled[0].long()
    want = chunk_attention(qc, k_pool[slots], v_pool[slots], scale)
    got = paged_prefill_attention(qc, k_pool, v_pool, shuffled, seg, scale, backend="triton")
    results.append(dict(kind="check", dtype=str(dt), heads=[H, HKV, D],
                        max_abs_err=float((got.float() - want.float()).abs().max())))
    print(json.dumps(results[-1]), flush=True)
    for config in CONFIGS:
        for name, table in (("contiguous", contiguous), ("shuffled", shuffled)):
            tiles = prefill_tiles(seg, launch_config(seg, dev, config)[0], dev)
            try:
                t = timed(lambda: paged_prefill_attention(qc, k_pool, v_pool, table, seg, scale, config=config,
                                                          tiles=tiles, backend="triton"))
            except Exception as e:                        # a config that does not fit (shared memory)
                t = None
                print(json.dumps(dict(kind="error", config=config, error=str(e)[:200])), flush=True)
            results.append(row("last_chunk", f"triton {name}", t, pairs(n, L), config=list(config)))

    def gathered_sdpa():
        s = shuffled[0].long()
        return chunk_attention(qc, k_pool[s], v_pool[s], scale)

    results.append(row("last_chunk", "sdpa gathered (engine before)", timed(gathered_sdpa), pairs(n, L)))
    results += per_backend("last_chunk", "sdpa gathered", gathered_sdpa, pairs(n, L), 3)

    def split_chunk(table, q_chunk, context):
        """The engine's split route for one chunk: earlier slots gathered, own K/V as the step holds them."""
        m = q_chunk.shape[0]
        s = table[0, :context - m].long()
        own = table[0, context - m: context].long()
        return split_chunk_attention(q_chunk, k_pool[s], v_pool[s], k_pool[own], v_pool[own], scale)

    for op in ("flash", "cudnn"):
        use_split_kernel(op)
        try:
            err = float((split_chunk(shuffled, qc, L).float() - want.float()).abs().max())
            t = timed(lambda: split_chunk(shuffled, qc, L))
        except Exception as e:
            t, err = None, None
            print(json.dumps(dict(kind="error", split=op, error=str(e)[:200])), flush=True)
        results.append(row("last_chunk", f"sdpa split prefix+diagonal {op} (gathered)", t, pairs(n, L),
                           max_abs_err=err, kernel_used=sdpa_split._working.get(False)))
    if not args.skip_whole:
        chunks = [(0, 0, min(n, L - s), s + min(n, L - s)) for s in range(0, L, n)]   # q is sliced per chunk
        best = min((r for r in results if r.get("name") == "triton contiguous" and r["ms"]), key=lambda r: r["ms"])
        config = tuple(best["config"])
        tile_lists = [prefill_tiles([c], launch_config([c], dev, config)[0], dev) for c in chunks]

        def triton_whole():
            for c, tiles in zip(chunks, tile_lists):
                paged_prefill_attention(q[c[3] - c[2]: c[3]], k_pool, v_pool, contiguous, [c], scale, config=config,
                                        tiles=tiles, backend="triton")

        total_pairs = L * (L + 1) // 2
        results.append(row("whole_prompt", "triton chunked", timed(triton_whole, 2), total_pairs, config=list(config)))
        qh = q.transpose(0, 1).unsqueeze(0)
        kh = k_pool[:L].transpose(0, 1).unsqueeze(0)
        vh = v_pool[:L].transpose(0, 1).unsqueeze(0)

        def hf_whole():
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)

        results.append(row("whole_prompt", "sdpa one call (HF)", timed(hf_whole, 2), total_pairs))
        results += per_backend("whole_prompt", "sdpa one call", hf_whole, total_pairs, 2)
        for op in ("flash", "cudnn"):
            use_split_kernel(op)

            def split_whole():
                for c in chunks:
                    split_chunk(contiguous, q[c[3] - c[2]: c[3]], c[3])
            try:
                t = timed(split_whole, 2)
            except Exception as e:
                t = None
                print(json.dumps(dict(kind="error", split=op, error=str(e)[:200])), flush=True)
            results.append(row("whole_prompt", f"sdpa split chunked {op}", t, total_pairs))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
