"""H2O's prompt mass against the prefill attention it sits beside: one layer, one whole causal prompt.

Times, per prompt length (median of ``--repeat`` runs; CUDA: synchronised around each call):

- ``attention``: the prefill attention that also returns each query's log-sum-exp (CPU: torch's fused flash op,
  what the engine's CPU route and the HF path run; CUDA: cuDNN's causal op, the engine's split route, or in fp32,
  which cuDNN refuses, the memory-efficient kernel, the HF path's and the fp32 gather route's; the JSON's
  ``attention_kernel`` says which ran: :func:`~sparse_hf.kernels.attention_lse.causal_attention_with_lse`);
- ``mass_lse``: ``attention_mass(..., lse=<the attention's>)``, one pass over ``q.k`` (this tree's prompt path);
- ``mass_two_pass``: ``attention_mass(..., lse=None)``, which computes the log-sum-exp itself first (the prompt
  path before: pass 1 + pass 2 over ``q.k``);

and prints their ratios to the attention, plus the ``q.k`` tile products the Triton kernel's passes visit at the GPU
tile sizes (counted from its causal tile-skipping rule, no GPU needed) relative to the attention's causal ``q.k``.

Pass 2's tiles can be swept: ``--mass-block-rows``, ``--mass-block-keys``, ``--mass-warps``, ``--mass-stages`` take
comma lists (``auto``: the default, :func:`~sparse_hf.kernels.attention_mass.mass_config`); every combination runs
``mass_lse`` and prints its own JSON line (``mass_config``, ``mass_lse_over_attention``, ``max_rel_diff`` against the
two-pass mass at the default tiles, which with the attention runs once per length); a combination the GPU cannot
launch (shared memory, registers) prints ``{"kind": "error", ...}`` and the sweep goes on.

    python benchmarks/bench_h2o_mass.py                                   # CPU: 2048,4096 tokens, 14/2 heads, D 64
    python benchmarks/bench_h2o_mass.py --device cuda --tokens 8192,32768,131072 --heads 28,4,128
    python benchmarks/bench_h2o_mass.py --device cuda --tokens 32768 --mass-block-rows 64,128 \
        --mass-block-keys 64,128,256 --mass-warps 4,8 --mass-stages 2,3,4
    TRITON_INTERPRET=1 python benchmarks/bench_h2o_mass.py --backend triton --tokens 512 --heads 4,2,32 --repeat 1

The mass backend is ``--backend`` (default ``auto``: Triton on CUDA in fp16/bf16, the torch reference in fp32 and on
the CPU; ``triton`` on the CPU runs the kernel under the interpreter, whose time follows the tiles it executes); the
JSON's ``mass_backend`` is the one that ran (the tile options only matter to Triton). ``--chunk 2048`` times
``mass_lse`` the way the engine runs it (``chunk_prefill_size`` queries per call, each over every earlier key, the
attention's log-sum-exp sliced per chunk) and ``triton_tiles`` still counts the whole-prompt call. Prints one JSON
line per length and tile combination.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from sparse_hf.kernels import attention_mass
from sparse_hf.kernels.attention_lse import causal_attention_with_lse
from sparse_hf.kernels.attention_mass import LSE_BLOCK_KEYS, LSE_BLOCK_ROWS, MassConfig, mass_config, mass_runs_triton
from sparse_hf.kernels.dispatch import plan_splits


def tile_products(n: int, H: int, Hkv: int, config: MassConfig, device: torch.device) -> dict:
    """``q.k`` products the Triton kernel computes for one whole causal prompt of ``n`` tokens, relative to the
    attention's ``H * n (n + 1) / 2`` causal pairs. Pass 1 (per KV head, rows ``t = query * G + g``): a (row block,
    key tile) pair runs when some row of the block may see some key of the tile. Pass 2 (per head, ``config``'s
    tiles, the query splits ``attention_mass`` picks on ``device``): each key tile's loop runs from the first query
    that may see it (or its split's start) in blocks of ``block_rows`` to the split's end."""
    G = H // Hkv
    T = n * G

    def pass1(block_rows: int, block_keys: int) -> int:
        total = 0
        for r0 in range(0, T, block_rows):
            qmax = (min(r0 + block_rows, T) - 1) // G                  # the block's last query position
            total += block_rows * block_keys * (qmax // block_keys + 1)  # key tiles starting at or before it
        return total * Hkv

    def pass2(rows: int, keys: int) -> int:
        key_blocks = -(-n // keys)
        split, splits, _ = plan_splits(n, Hkv * key_blocks, device, None, max_block=rows)
        total = 0
        for j in range(key_blocks):
            for s0 in range(0, n, split):
                first = max(s0, j * keys)
                total += -(-max(0, min(s0 + split, n) - first) // rows) * rows * keys
        return total * H

    causal = H * n * (n + 1) // 2
    p1, p2 = pass1(LSE_BLOCK_ROWS, LSE_BLOCK_KEYS), pass2(config.block_rows, config.block_keys)
    return dict(pass1_over_causal=round(p1 / causal, 3), pass2_over_causal=round(p2 / causal, 3),
                two_pass_over_causal=round((p1 + p2) / causal, 3))


def sweep_values(text: str) -> list:
    """``"64,auto"`` -> ``[64, None]`` (``None``: the default tile)."""
    return [None if x.strip() == "auto" else int(x) for x in text.split(",")]


def timed(fn, repeat: int, device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", default=None, help="comma-separated prompt lengths")
    p.add_argument("--heads", default=None, help="H,Hkv,D (default CPU 14,2,64; CUDA 28,4,128)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backend", default="auto", help="the mass kernel's backend: auto | triton | torch")
    p.add_argument("--chunk", type=int, default=0,
                   help="mass_lse in chunks of this many queries, each over every earlier key (the engine's "
                        "chunk_prefill_size, 2048); 0: the whole prompt in one call")
    for name, what in (("block-rows", "queries of one head per tile"), ("block-keys", "keys per tile"),
                       ("warps", "num_warps"), ("stages", "num_stages")):
        p.add_argument(f"--mass-{name}", default="auto", help=f"pass 2's {what}: comma list, 'auto' the default")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tokens = [int(x) for x in (args.tokens or ("8192,32768,131072" if cuda else "2048,4096")).split(",")]
    H, Hkv, D = (int(x) for x in (args.heads or ("28,4,128" if cuda else "14,2,64")).split(","))
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    scale = D ** -0.5
    configs = [MassConfig(*c) for c in itertools.product(
        *(sweep_values(x) for x in (args.mass_block_rows, args.mass_block_keys, args.mass_warps, args.mass_stages)))]
    g = torch.Generator(device="cpu").manual_seed(0)
    for n in tokens:
        q = torch.randn(1, H, n, D, generator=g).to(device, dtype)
        k = torch.randn(1, Hkv, n, D, generator=g).to(device, dtype)
        v = torch.randn(1, Hkv, n, D, generator=g).to(device, dtype)
        cols = torch.arange(n, device=device)
        key_pos = cols.expand(1, Hkv, n)
        valid = torch.ones((), dtype=torch.bool, device=device).expand(1, Hkv, n)
        fused = causal_attention_with_lse(q, k, v, scale)              # warm-up (and the lse the mass reuses)
        if fused is None:
            raise SystemExit(f"no fused attention returning the log-sum-exp runs for {dtype} on {device}")
        _, lse, kernel = fused

        def mass(with_lse, config=None):
            if not (with_lse and args.chunk):
                return attention_mass(q, k, key_pos, valid, cols, None, scale, backend=args.backend,
                                      lse=lse if with_lse else None, config=config)
            total = torch.zeros(1, Hkv, n, device=device)              # the engine's way: chunk by chunk
            for s0 in range(0, n, args.chunk):
                e = min(n, s0 + args.chunk)
                total[..., :e] += attention_mass(q[:, :, s0:e], k[:, :, :e], key_pos[..., :e], valid[..., :e],
                                                 cols[s0:e], None, scale, backend=args.backend,
                                                 lse=lse[:, :, s0:e], config=config)
            return total

        m2 = mass(False)                                               # warm-up (compiles the Triton kernel)
        t_att = timed(lambda: causal_attention_with_lse(q, k, v, scale), args.repeat, device)
        t_two = timed(lambda: mass(False), args.repeat, device)
        for config in configs:
            cfg = mass_config(D, config)
            try:
                m1 = mass(True, cfg)                                   # warm-up (compiles this tile's kernel)
                t_lse = timed(lambda: mass(True, cfg), args.repeat, device)
            except Exception as e:                                     # a tile the GPU cannot launch
                print(json.dumps(dict(kind="error", tokens=n, mass_config=list(cfg), error=str(e)[:200])),
                      flush=True)
                continue
            err = float((m1 - m2).abs().max() / m2.abs().max())
            print(json.dumps(dict(device=str(device), backend=args.backend,
                                  mass_backend="triton" if mass_runs_triton(args.backend, q, k) else "torch",
                                  attention_kernel=kernel,
                                  dtype=str(dtype).replace("torch.", ""), tokens=n, heads=[H, Hkv, D],
                                  mass_config=list(cfg), chunk=args.chunk, attention_s=round(t_att, 4), mass_lse_s=round(t_lse, 4),
                                  mass_two_pass_s=round(t_two, 4),
                                  mass_lse_over_attention=round(t_lse / t_att, 3),
                                  mass_two_pass_over_attention=round(t_two / t_att, 3),
                                  lse_over_two_pass=round(t_lse / t_two, 3), max_rel_diff=err,
                                  triton_tiles=tile_products(n, H, Hkv, cfg, device))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
