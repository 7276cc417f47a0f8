"""Bandwidth of the pieces of an engine decode step, one at a time (no model build): the decode attention kernel
over a slot pool at several split-K sizes and tiles, the GEMMs of a Qwen2.5-7B layer at M = 1 and 8 (cuBLAS and
the skinny Triton GEMM at several tiles), and the fused layer ops.

    python benchmarks/bench_decode_ops.py [--cases 131072x1,4096x8] [--splits 256,512,1024,2048,4096]
    python benchmarks/bench_decode_ops.py --small          # CPU smoke run (tiny sizes, torch/interpreted kernels)

Each line is a JSON object: ``op``, shape, ``us`` (device time per call, from calls replayed in a CUDA graph) and
``gbps`` = the bytes the op must move (weights or K/V read, outputs written) over its time, to compare with the copy
bandwidth (~4.25 TB/s on an H200). The attention rows say which split size reaches the bandwidth on one long row (few ``B * Hkv`` programs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from sparse_hf.kernels import rms_norm, rope_qkv, silu_mul, sparse_decode_attention
from sparse_hf.kernels.dispatch import plan_splits
from sparse_hf.kernels.skinny_gemm import skinny_linear

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 3584, 28, 4, 128, 18944, 152064


def time_us(fn, device: torch.device, repeats: int = 20) -> float:
    """Device time of one ``fn()`` call: ``repeats`` calls captured in one CUDA graph, replayed and timed with
    events (so host launch overhead, ~20-100 us for a Triton launch from Python, is not counted). CPU: wall time."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(repeats):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / repeats)
    return statistics.median(times)


def emit(op: str, us: float, nbytes: int, **shape) -> None:
    print(json.dumps(dict(op=op, **shape, us=round(us, 2), gbps=round(nbytes / us / 1e3, 1))), flush=True)


def bench_attention(length: int, batch: int, splits: list[int | None], dtype, device, hkv=KV_HEADS, heads=HEADS,
                    d=HEAD_DIM) -> None:
    """One layer's decode attention of ``batch`` rows of ``length`` tokens over a shuffled slot pool."""
    S = length * batch
    k = torch.randn(S + 1, hkv, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    tables = torch.randperm(S, device=device).view(batch, length).to(torch.int32)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, d, dtype=dtype, device=device)
    kk = k.permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
    vv = v.permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
    idx = tables.unsqueeze(1).expand(batch, hkv, length)
    nbytes = 2 * S * hkv * d * k.element_size() + S * 4
    tiles = [(64, 4)] if device.type != "cuda" else [(64, 4), (64, 8), (128, 4), (128, 8), (32, 4)]
    for block_n, warps in tiles:
        for split in splits:
            chosen = plan_splits(length, batch * hkv, device, split, max_block=block_n)
            us = time_us(lambda: sparse_decode_attention(q, kk, vv, idx, num_indices=lens, scale=d ** -0.5,
                                                         split_size=split, block_n=block_n, num_warps=warps), device)
            emit("attention", us, nbytes, length=length, batch=batch, split_size=chosen[0], num_splits=chosen[1],
                 block_n=chosen[2], num_warps=warps, default=split is None and (block_n, warps) == (64, 4))


#: (block_n, block_k, num_stages, num_warps) of the weight-streaming kernel tried against cuBLAS.
SKINNY_CONFIGS = ((16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (32, 128, 6, 4), (64, 256, 3, 8))


def bench_gemms(batch: int, dtype, device, sizes, configs=SKINNY_CONFIGS) -> None:
    """cuBLAS (``F.linear``) and the skinny Triton GEMM (each config) on each ``(name, K, N)`` weight."""
    x = torch.randn(batch, max(i for _, i, _ in sizes), dtype=dtype, device=device)
    for name, n_in, n_out in sizes:
        w = torch.randn(n_out, n_in, dtype=dtype, device=device)
        xi = x[:, :n_in].contiguous()
        nbytes = w.numel() * w.element_size() + batch * (n_in + n_out) * 2
        emit(f"gemm_{name}", time_us(lambda: F.linear(xi, w), device), nbytes, m=batch, k=n_in, n=n_out, impl="cublas")
        for bn, bk, stages, warps in configs:
            backend = "triton" if device.type == "cuda" else "auto"       # CPU smoke run: F.linear
            us = time_us(lambda: skinny_linear(xi, w, backend=backend, block_n=bn, block_k=bk, num_stages=stages,
                                               num_warps=warps), device)
            emit(f"gemm_{name}", us, nbytes, m=batch, k=n_in, n=n_out, impl="skinny", block_n=bn, block_k=bk,
                 num_stages=stages, num_warps=warps)
        del w


def bench_layer_ops(batch: int, dtype, device, hidden=HIDDEN, inter=INTER, heads=HEADS, hkv=KV_HEADS,
                    d=HEAD_DIM) -> None:
    x = torch.randn(batch, hidden, dtype=dtype, device=device)
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=dtype, device=device)
    el = x.element_size()
    emit("add_rms_norm", time_us(lambda: rms_norm(x, w, 1e-6, res), device), 3 * x.numel() * el, m=batch)
    gu = torch.randn(batch, 2 * inter, dtype=dtype, device=device)
    emit("silu_mul", time_us(lambda: silu_mul(gu), device), int(1.5 * gu.numel() * el), m=batch)
    qkv = torch.randn(batch, (heads + 2 * hkv) * d, dtype=dtype, device=device)
    cos = torch.randn(4096, d, device=device)
    pos = torch.arange(batch, device=device)
    pool = torch.zeros(batch + 1, hkv, d, dtype=dtype, device=device)
    slots = torch.arange(batch, device=device)
    emit("rope_qkv_store", time_us(lambda: rope_qkv(qkv, pos, cos, cos, heads, hkv, k_pool=pool, v_pool=pool.clone(),
                                                    slot_mapping=slots), device), 2 * qkv.numel() * el, m=batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="131072x1,32768x2,4096x8")
    p.add_argument("--splits", default="256,512,1024,2048,4096")
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    splits = [None] + [int(s) for s in args.splits.split(",") if s]
    if args.small:
        bench_attention(512, 1, [None, 128], dtype, device, hkv=2, heads=4, d=16)
        bench_gemms(2, dtype, device, [("tiny", 64, 96)], configs=((16, 32, 2, 4),))
        bench_layer_ops(2, dtype, device, hidden=64, inter=96, heads=4, hkv=2, d=16)
        return 0
    with torch.inference_mode():
        for case in args.cases.split(","):
            length, batch = (int(v) for v in case.split("x"))
            bench_attention(length, batch, splits, dtype, device)
        sizes = [("qkv", HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM), ("o", HEADS * HEAD_DIM, HIDDEN),
                 ("gate_up", HIDDEN, 2 * INTER), ("down", INTER, HIDDEN), ("lm_head", HIDDEN, VOCAB)]
        for batch in (1, 8):
            bench_gemms(batch, dtype, device, sizes)
            bench_layer_ops(batch, dtype, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
