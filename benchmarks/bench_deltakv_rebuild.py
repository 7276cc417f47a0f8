"""DeltaKV's rebuild at the HF bench's 128K shape: the two-kernel path (gather + cuBLAS ``up`` + writeback) as a whole
and per stage against each stage's byte floor, a sweep of the two kernels' tiles, and the one-kernel variant
(``deltakv_rebuild_fused``). 13,039 picks of ~118K compressed tokens, latent 256 (int4), ``Dx = 1024`` (4 KV heads x
128, K and V), bf16, one row.

    python benchmarks/bench_deltakv_rebuild.py --block-m 32 --gather-block auto,8,16,32,64 \\
        --writeback-block auto,2,4,8,16 --warps auto,4,8                                           # H200, one call
    TRITON_INTERPRET=1 python benchmarks/bench_deltakv_rebuild.py --small                          # CPU smoke run

Prints JSON lines: the two-kernel path (heuristic tiles), one line per stage and tile (``block_m``, ``num_warps``;
``auto``: :func:`~sparse_hf.kernels.deltakv_rebuild.rebuild_tile`'s choice, shown), the best tiles' total, and the
fused variant per ``--block-m``. Times are microseconds per call on CUDA (``--small``: one interpreted call, no
timing): ``us`` is the median replay of a CUDA graph of 20 calls, each after an L2 flush (the flush's own graph
subtracted), as the decode step's graph runs them; ``us_eager`` the median of single eager calls between CUDA events,
the method of the numbers before wt-R, which adds the host's launch time whenever the GPU waits for it. ``bytes`` are
what a stage must move (reads and writes, DRAM), ``floor_us`` those bytes at 4.24 TB/s (the H200's measured copy
bandwidth), ``x_floor`` = ``us / floor_us``. ``max_abs_diff`` is against the torch reference (stages: against the
heuristic tiles' output, which must match exactly).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_selection_topk import timed  # noqa: E402  (median ms of eager calls between CUDA events)

BANDWIDTH = 4.24e12                                     # the H200's measured copy bandwidth (run N)


def make(picks, n_comp, bits, r, Hkv, D, device, dtype, step=10, S=4, nbr=1):
    from sparse_hf.deltakv.quant import quantize
    g = torch.Generator().manual_seed(0)
    M = S + -(-n_comp // step)
    n_lat = n_comp - -(-n_comp // step)
    Dx = Hkv * 2 * D
    center_x = torch.randn(1, M, Dx, generator=g).to(device, dtype)
    fathers = torch.randint(0, M, (1, n_lat, nbr), generator=g).to(device, torch.int16)
    stored = quantize(torch.randn(1, n_lat, r, generator=g), bits)
    stored = [None if t is None else t.to(device) for t in stored]
    if bits == 0:
        stored[0] = stored[0].to(dtype)
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


def outputs(case):
    B, k = case["pick"].shape
    k_out = torch.empty(B, case["Hkv"], k, case["D"], dtype=case["center_x"].dtype, device=case["center_x"].device)
    return k_out, torch.empty_like(k_out)


def run(case, backend="triton", fused=False, block_m=32, out=None, module=None):
    """The rebuild of ``case`` through ``module``'s ``deltakv_rebuild_kv`` (default: this tree's), or fused."""
    from sparse_hf.kernels import deltakv_rebuild as new
    from sparse_hf.kernels.deltakv_fused import deltakv_rebuild_fused
    c = case
    k_out, v_out = out if out is not None else outputs(c)
    codes, scale, offset = c["stored"]
    if fused:
        return deltakv_rebuild_fused(c["pick"], codes, scale, offset, c["fathers"], c["center_x"], c["w"], c["bias"],
                                     c["step"], c["S"], c["cos"], c["sin"], k_out, v_out, block_m=block_m)
    return (module or new).deltakv_rebuild_kv(c["pick"], codes, scale, offset, c["fathers"], c["center_x"],
                              lambda z: torch.nn.functional.linear(z, c["w"], c["bias"]), c["w"].dtype, c["step"],
                              c["S"], c["cos"], c["sin"], k_out, v_out, backend=backend)


def floor_bytes(case):
    """DRAM bytes each stage must move: the gather reads the picks' indices, codes and scales and writes the latents;
    the GEMM reads the latents and ``W_up`` and writes ``[k, Dx]``; the writeback reads the picks' indices and
    father ids, the ``up`` row and father rows of each latent pick (a center: its own row), the RoPE tables, and
    writes K and V."""
    c = case
    k = c["pick"].shape[1]
    codes, scale, offset = c["stored"]
    el = c["center_x"].element_size()
    r, dx = c["w"].shape[1], c["w"].shape[0]
    lat_row = sum(t.shape[-1] * t.element_size() for t in (codes, scale, offset) if t is not None)
    n_center = int((c["pick"].clamp(min=0) % c["step"] == 0).sum())
    nbr = c["fathers"].shape[-1]
    fath = (k - n_center) * ((1 + nbr) * dx * el + nbr * c["fathers"].element_size()) + n_center * dx * el
    return dict(gather=k * (8 + lat_row + r * el), gemm=k * (r + dx) * el + dx * (r + 1) * el,
                writeback=k * 8 + fath + k * 2 * c["D"] * el + k * dx * el)


def time_us(fn, device, reps=20):
    """``(us, us_eager)`` per call (see the module docstring); ``(None, None)`` off CUDA (one call, untimed)."""
    if device.type != "cuda":
        fn()
        return None, None
    eager = timed(fn, 50, "cuda") * 1e3
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    junk = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                junk.zero_()
                if with_fn:
                    fn()
        graphs.append(g)
    torch.cuda.synchronize()
    both, flush = (timed(g.replay, 10, "cuda") * 1e3 / reps for g in graphs)
    return round(both - flush, 1), round(eager, 1)


def stage_line(stage, us, bytes_, **extra):
    floor = bytes_ / BANDWIDTH * 1e6
    us, eager = us
    return dict(path="two-kernel stage", stage=stage, **extra, us=us, us_eager=eager, bytes=bytes_,
                floor_us=round(floor, 1), x_floor=None if us is None else round(us / floor, 1))


def load_baseline(path):
    """An older ``kernels/deltakv_rebuild.py`` (e.g. ``git show 7bf6d0c:kernels/deltakv_rebuild.py``) as a module
    beside :mod:`sparse_hf.kernels.deltakv_rebuild`, for an A/B in the same process."""
    spec = importlib.util.spec_from_file_location("sparse_hf.kernels._rebuild_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sweep(case, gather_blocks, writeback_blocks, warps, device, baseline=None):
    """The two kernels' stages at each tile (and the GEMM between them; with ``baseline``, that module's two
    kernels too), one JSON line each; returns the best ``(us, tile)`` per stage (``None`` off CUDA)."""
    from sparse_hf.kernels import deltakv_rebuild as new
    c = case
    B, k = c["pick"].shape
    codes, scale, offset = c["stored"]
    floors = floor_bytes(c)
    z = new.deltakv_gather_latents(c["pick"], codes, scale, offset, c["step"], c["w"].dtype, "triton")
    gemm = lambda: torch.nn.functional.linear(z, c["w"], c["bias"])
    up_out = gemm()
    t = time_us(gemm, device)
    print(json.dumps(stage_line("gemm", t, floors["gemm"])))
    best = dict(gemm=(t[0], None))

    def gather(mod, *tile):
        return lambda: [mod.deltakv_gather_latents(c["pick"], codes, scale, offset, c["step"], c["w"].dtype,
                                                   "triton", *tile)]

    def writeback(mod, *tile):
        out = outputs(c)
        return lambda: list(mod.deltakv_writeback(c["pick"], up_out, c["fathers"], c["center_x"], c["step"], c["S"],
                                                  c["cos"], c["sin"], *out, None, 1e-6, "triton", *tile))

    bh, hb, bdv = new.writeback_widths(c["Hkv"], c["D"], c["center_x"].shape[-1] // c["Hkv"] - c["D"])
    widths = dict(gather=new.gather_width(c["w"].shape[1]), writeback=bh * (2 * hb + bdv))
    for stage, blocks, make in (("gather", gather_blocks, gather), ("writeback", writeback_blocks, writeback)):
        auto = new.rebuild_tile(B, k, widths[stage], device)
        want = [t.clone() for t in make(new)()]
        tiles = dict.fromkeys(new.rebuild_tile(B, k, widths[stage], device, bm, nw) for bm in blocks for nw in warps)
        runs = [(dict(block_m=t[0], num_warps=t[1], auto=t == auto), make(new, *t)) for t in tiles]
        if baseline is not None:
            runs.append((dict(baseline=True), make(baseline)))
        for fields, fn in runs:
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(fn(), want))
            t = time_us(fn, device)
            print(json.dumps(stage_line(stage, t, floors[stage], **fields, max_abs_diff=diff)))
            if t[0] is not None and "baseline" not in fields and (stage not in best or t[0] < best[stage][0]):
                best[stage] = (t[0], (fields["block_m"], fields["num_warps"]))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--picks", type=int, default=13039)
    p.add_argument("--compressed", type=int, default=131008)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--neighbors", type=int, default=1, help="fathers per latent (the issue-12 bench's compressor: 1)")
    p.add_argument("--layers", type=int, default=21, help="compressed layers per decode step (the per-step estimate)")
    p.add_argument("--block-m", default="32", help="the fused kernel's tiles ('' to skip it)")
    p.add_argument("--gather-block", default="auto", help="gather tiles (picks per program), e.g. auto,8,16,32")
    p.add_argument("--writeback-block", default="auto", help="writeback tiles (picks per program), e.g. auto,4,8")
    p.add_argument("--warps", default="auto", help="num_warps for both kernels, e.g. auto,4,8")
    p.add_argument("--baseline", help="an older kernels/deltakv_rebuild.py to time beside this tree's (A/B)")
    p.add_argument("--small", action="store_true", help="CPU, interpreted, tiny shapes (smoke run)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    if args.small:
        case = make(40, 300, args.bits, 32, 2, 16, device, torch.float32, nbr=args.neighbors)
    else:
        case = make(args.picks, args.compressed, args.bits, 256, 4, 128, device, torch.bfloat16, nbr=args.neighbors)
    ints = lambda s: [None if x == "auto" else int(x) for x in s.split(",") if x]
    ref_k, ref_v = (t.clone() for t in run(case, "torch"))

    def diff_to_ref(kv):
        return round(max((a.float() - b.float()).abs().max().item() for a, b in zip(kv, (ref_k, ref_v))), 5)

    out = outputs(case)
    k, layers = case["pick"].shape[1], args.layers
    total = time_us(lambda: run(case, out=out), device)
    print(json.dumps(dict(path="two-kernel", tiles="auto", us=total[0], us_eager=total[1], picks=k,
                          per_step_ms=None if total[0] is None else round(total[0] * layers / 1e3, 2),
                          layers=layers, max_abs_diff=diff_to_ref(run(case, out=out)))))
    base = load_baseline(args.baseline) if args.baseline else None
    if base is not None:
        t = time_us(lambda: run(case, out=out, module=base), device)
        print(json.dumps(dict(path="baseline two-kernel", file=args.baseline, us=t[0], us_eager=t[1],
                              max_abs_diff=diff_to_ref(run(case, out=out, module=base)),
                              saving_per_step_ms=None if t[0] is None else round((t[0] - total[0]) * layers / 1e3,
                                                                                 2))))
    best = sweep(case, ints(args.gather_block), ints(args.writeback_block), ints(args.warps), device, base)
    if device.type == "cuda":
        us = round(sum(t for t, _ in best.values()), 1)
        print(json.dumps(dict(path="two-kernel best tiles (sum of stages)", us=us, gather=best["gather"][1],
                              writeback=best["writeback"][1], per_step_ms=round(us * layers / 1e3, 2))))
    for bm in ints(args.block_m):
        kv = run(case, fused=True, block_m=bm, out=out)
        print(json.dumps(dict(path="fused", block_m=bm, max_abs_diff=diff_to_ref(kv),
                              **dict(zip(("us", "us_eager"), time_us(lambda: run(case, fused=True, block_m=bm,
                                                                                 out=out), device))))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
