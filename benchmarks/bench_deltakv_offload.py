"""DeltaKV with and without ``offload_latents`` on the HF path: decode tok/s, device and host KV bytes, peak memory.

    python benchmarks/bench_deltakv_offload.py [--cases 32768x1,131072x1] [--bits 4] [--steps 16] [--no-graph]
    python benchmarks/bench_deltakv_offload.py --small            # CPU smoke run (tiny model, eager)

One model (random weights in the Qwen2.5-7B shape, bf16; the bench's random latent-256 compressor), each case run
by :func:`sparse_hf.bench.run_case` in the same process as ``deltakv+graph`` with the latents on the GPU
(``variant: gpu``), with ``offload_latents=True`` (``offload``) and with it but without the side-stream prefetch
of the picked latents (``offload-no-prefetch``: each layer's gather reads host memory in its own turn). Prints one
JSON line per run (``sparse-hf bench``'s fields plus ``kv_host_bytes``), then one summary line per case: decode
speed against ``gpu``, device KV bytes per prompt token with and without offload,
and the longest prompt whose device KV bytes alone would fit beside the weights in the GPU's memory at batch 1
(``kv_fit_tokens``; prefill activations come on top, so it is an upper bound for both layouts alike).
The same runs through the CLI: ``sparse-hf bench --methods deltakv+graph --knob deltakv:offload_latents=true``.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="32768x1,131072x1")
    p.add_argument("--bits", type=int, default=4, help="kv_quant_bits of the latents (0, 8, 4)")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--no-graph", action="store_true", help="eager decode instead of deltakv+graph")
    p.add_argument("--small", action="store_true", help="a tiny model on CPU (smoke run)")
    p.add_argument("--variants", default="gpu,offload,offload-no-prefetch")
    args = p.parse_args(argv)

    from sparse_hf.bench import build_model, copy_bandwidth, parse_cases, run_case
    from sparse_hf.hf.deltakv_cache import CompressedCache

    variants = args.variants.split(",")
    if "gpu" not in variants or not set(variants) <= {"gpu", "offload", "offload-no-prefetch"}:
        p.error("--variants: gpu plus any of offload, offload-no-prefetch")

    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model("tiny" if args.small else "qwen2.5-7b", device, dtype)
    cases = parse_cases("1024x1" if args.small else args.cases)
    method = "deltakv" if args.no_graph or device.type == "cpu" else "deltakv+graph"
    bandwidth = copy_bandwidth(device)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    base = [("deltakv", "kv_quant_bits", args.bits)] + ([("deltakv", "full_attn_layers", "0")] if args.small else [])

    def run(length, batch, variant, steps):
        CompressedCache.prefetch_offloaded = variant != "offload-no-prefetch"
        knobs = base + [("deltakv", "offload_latents", variant != "gpu")]
        try:
            return run_case(model, device, length, batch, method, args.budget, steps, bandwidth, knobs)
        finally:
            CompressedCache.prefetch_offloaded = True

    for variant in variants:    # warm-up: Triton JIT and graph capture outside the timed runs
        run(512, 1, variant, 4)
    for length, batch in cases:
        rows = {}
        for variant in variants:
            try:
                r = run(length, batch, variant, args.steps)
            except torch.OutOfMemoryError:
                r = dict(L=length, B=batch, error="OOM")
            r.update(variant=variant)
            r.pop("knobs", None)
            print(json.dumps(r), flush=True)
            rows[variant] = r
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if all("decode_tok_s" in r for r in rows.values()):
            per_token = {v: r["kv_bytes"] / (batch * length) for v, r in rows.items()}
            summary = dict(summary=True, L=length, B=batch, bits=args.bits, method=method,
                           decode_x_gpu={v: round(r["decode_tok_s"] / rows["gpu"]["decode_tok_s"], 3)
                                         for v, r in rows.items() if v != "gpu"},
                           device_kv_bytes_per_token={v: round(b, 1) for v, b in per_token.items()},
                           host_kv_bytes_per_token={v: round(r.get("kv_host_bytes", 0) / (batch * length), 1)
                                                    for v, r in rows.items()},
                           peak_extra_gib={v: r.get("peak_extra_gib") for v, r in rows.items()})
            if total:
                summary["kv_fit_tokens"] = {v: int((total - weights) / b) for v, b in per_token.items()}
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
