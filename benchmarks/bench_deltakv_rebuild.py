"""One-kernel DeltaKV rebuild (``deltakv_rebuild_fused``) against the two-kernel path (gather + cuBLAS ``up`` +
writeback) at the HF bench's 128K shape: 13,039 picks of ~118K compressed tokens, latent 256 (int4), ``Dx = 1024``
(4 KV heads x 128, K and V), bf16, one row.

    python benchmarks/bench_deltakv_rebuild.py [--picks 13039] [--block-m 32,64] [--bits 4]     # H200
    TRITON_INTERPRET=1 python benchmarks/bench_deltakv_rebuild.py --small                          # CPU smoke run

Prints one JSON line per variant, and per stage of the two-kernel path: microseconds per call (CUDA events, median of 50 after 10 warm-ups; with
``--small`` one interpreted call, no timing), the bytes each path moves, and the largest difference between the two
paths' K/V (bf16 rounding expected).
"""

from __future__ import annotations

import argparse
import json

import torch


def make(picks, n_comp, bits, r, Hkv, D, device, dtype, step=10, S=4):
    from sparse_hf.deltakv.quant import quantize
    g = torch.Generator().manual_seed(0)
    M = S + -(-n_comp // step)
    n_lat = n_comp - -(-n_comp // step)
    Dx = Hkv * 2 * D
    center_x = torch.randn(1, M, Dx, generator=g).to(device, dtype)
    fathers = torch.randint(0, M, (1, n_lat, 1), generator=g).to(device, torch.int16)
    stored = quantize(torch.randn(1, n_lat, r, generator=g), bits)
    stored = [None if t is None else t.to(device) for t in stored]
    pick = torch.randperm(n_comp, generator=g)[:picks].view(1, picks).to(device)
    w = (torch.randn(Dx, r, generator=g) / r ** 0.5).to(device, dtype)
    bias = torch.randn(Dx, generator=g).to(device, dtype) * 0.01
    pos = torch.arange(picks, device=device).view(1, picks)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    ang = pos.float().unsqueeze(-1) * inv
    emb = torch.cat([ang, ang], -1)
    return dict(center_x=center_x, fathers=fathers, stored=stored, pick=pick, w=w, bias=bias,
                cos=emb.cos().to(dtype).contiguous(), sin=emb.sin().to(dtype).contiguous(), Hkv=Hkv, D=D, step=step,
                S=S)


def run(case, fused, block_m=32):
    from sparse_hf.kernels import deltakv_rebuild_kv
    from sparse_hf.kernels.deltakv_fused import deltakv_rebuild_fused
    c = case
    B, k = c["pick"].shape
    k_out = torch.empty(B, c["Hkv"], k, c["D"], dtype=c["center_x"].dtype, device=c["center_x"].device)
    v_out = torch.empty_like(k_out)
    codes, scale, offset = c["stored"]
    if fused:
        return deltakv_rebuild_fused(c["pick"], codes, scale, offset, c["fathers"], c["center_x"], c["w"], c["bias"],
                                     c["step"], c["S"], c["cos"], c["sin"], k_out, v_out, block_m=block_m)
    return deltakv_rebuild_kv(c["pick"], codes, scale, offset, c["fathers"], c["center_x"],
                              lambda z: torch.nn.functional.linear(z, c["w"], c["bias"]), c["w"].dtype, c["step"],
                              c["S"], c["cos"], c["sin"], k_out, v_out, backend="triton")


def stages(case):
    """The two-kernel path's three stages as separate calls (gather + dequantise, the ``up`` GEMM, the writeback),
    each timed alone, to show which one keeps the rebuild above its byte floor."""
    from sparse_hf.kernels.deltakv_rebuild import deltakv_gather_latents, deltakv_writeback
    c = case
    B, k = c["pick"].shape
    codes, scale, offset = c["stored"]
    k_out = torch.empty(B, c["Hkv"], k, c["D"], dtype=c["center_x"].dtype, device=c["center_x"].device)
    v_out = torch.empty_like(k_out)
    gather = lambda: deltakv_gather_latents(c["pick"], codes, scale, offset, c["step"], c["w"].dtype, "triton")
    z = gather()
    gemm = lambda: torch.nn.functional.linear(z, c["w"], c["bias"]).contiguous()
    up_out = gemm()
    write = lambda: deltakv_writeback(c["pick"], up_out, c["fathers"], c["center_x"], c["step"], c["S"], c["cos"],
                                      c["sin"], k_out, v_out, None, 1e-6, "triton")
    el = c["center_x"].element_size()
    r, dx = c["w"].shape[1], c["w"].shape[0]
    floor = dict(gather=k * (r // 2 + r * el), gemm=k * (r + dx) * el + dx * r * el,
                 writeback=k * dx * el * 3)           # up out + the fathers' centers read, K/V written
    return {name: (fn, floor[name]) for name, fn in (("gather", gather), ("gemm", gemm), ("writeback", write))}


def time_us(fn, device):
    if device.type != "cuda":
        fn()
        return None
    for _ in range(10):
        fn()
    times = []
    for _ in range(50):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return round(sorted(times)[len(times) // 2], 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--picks", type=int, default=13039)
    p.add_argument("--compressed", type=int, default=131008)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--block-m", default="32,64")
    p.add_argument("--small", action="store_true", help="CPU, interpreted, tiny shapes (smoke run)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    if args.small:
        case = make(40, 300, args.bits, 32, 2, 16, device, torch.float32)
    else:
        case = make(args.picks, args.compressed, args.bits, 256, 4, 128, device, torch.bfloat16)
    ref_k, ref_v = (t.clone() for t in run(case, False))
    k, r, dx = case["pick"].shape[1], case["w"].shape[1], case["w"].shape[0]
    el = case["center_x"].element_size()
    roundtrip = k * (r + dx) * el * 2                       # latents and up output, written and read back
    print(json.dumps(dict(path="two-kernel", us=time_us(lambda: run(case, False), device), picks=k,
                          latents_and_up_roundtrip_bytes=roundtrip)))
    bandwidth = 4.24e12                                     # the H200's measured copy bandwidth (run N)
    for name, (fn, floor_bytes) in stages(case).items():
        us = time_us(fn, device)
        print(json.dumps(dict(path="two-kernel stage", stage=name, us=us, bytes=floor_bytes,
                              floor_us_at_4_24_TBps=round(floor_bytes / bandwidth * 1e6, 1))))
    for bm in (int(x) for x in args.block_m.split(",")):
        kk, vv = run(case, True, bm)
        diff = max((kk.float() - ref_k.float()).abs().max().item(), (vv.float() - ref_v.float()).abs().max().item())
        print(json.dumps(dict(path="fused", block_m=bm, us=time_us(lambda: run(case, True, bm), device),
                              max_abs_diff_vs_two_kernel=round(diff, 5))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
