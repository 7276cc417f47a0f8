"""Where DeltaKV's prompt-end compression time goes on the HF path (issue 12: +26% TTFT at 128K).

    python benchmarks/profile_deltakv_prefill.py --length 131072 [--bits 4] [--steps 8]
    python benchmarks/profile_deltakv_prefill.py --small            # CPU smoke run

Random weights in the Qwen2.5-7B shape (bf16) and a random latent-256 compressor (the bench's). One prefill of
``length`` tokens with a DeltaKV cache, then ``steps`` eager decode steps. Each piece of the compression (the
layer's ``_flush``: raw-token gather + inverse RoPE, nearest centers, down/up projections, quantisation, row writes,
keeping the raw buffer) is timed with a device sync around it, so the pieces add up to the compression's share of
the TTFT. Prints one JSON line: ``ttft_s``, ``flush_s`` (all layers), ``parts_s``, ``decode_step_ms``, ``kv_ratio``
and the KV bytes by part (summed over layers, as a fraction of a full cache).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from collections import defaultdict

import torch


def _timed(owner, name, label, totals, device):
    """Wrap ``owner.name`` so each call adds its synced wall time to ``totals[label]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = original(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        totals[label] += time.perf_counter() - t
        return out

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def _center_search_micro(length, device, dtype, dim=1024, step=10, sink=4):
    """One layer's prompt-end center search at ``length`` tokens (``x [1, L, dim]``, every ``step``-th a center),
    timed with the fp32 GEMM and with the half-precision GEMM (fp32 accumulation), and how many fathers agree."""
    from sparse_hf.deltakv import clustering

    x = torch.randn(1, length, dim, device=device).to(dtype)
    pos = torch.arange(length, device=device).view(1, -1)
    is_center = (pos < sink) | ((pos - sink) % step == 0)
    centers, cpos = x[:, is_center[0]], pos[:, is_center[0]]

    def visible(i, j):
        return sink + -(-max(0, j - sink) // step)

    out, ms = {}, {}
    for name, half in (("fp32", False), ("half", True)):
        clustering.HALF_GEMM_SCORES = half
        for rep in range(2):                               # the first call warms up cuBLAS
            torch.cuda.synchronize()
            t = time.perf_counter()
            out[name] = clustering.nearest_centers(x, centers, pos, cpos, 1, "l2", visible_prefix=visible)
            torch.cuda.synchronize()
            ms[name] = round(1e3 * (time.perf_counter() - t), 2)
    clustering.HALF_GEMM_SCORES = True
    return dict(ms=ms, agree=round((out["fp32"] == out["half"]).float().mean().item(), 6),
                half_gemm_ran=clustering._half_gemm_ok)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--bits", type=int, default=4, help="kv_quant_bits of the latents (0, 8, 4)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--small", action="store_true", help="a tiny model on CPU (smoke run)")
    args = p.parse_args(argv)

    import sparse_hf
    from sparse_hf.bench import _make_cache, build_model
    from sparse_hf.deltakv import state as core
    from sparse_hf.hf.deltakv_cache import CompressedCache
    from sparse_hf.hf.deltakv_layer import DeltaKVLayer

    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model("tiny" if args.small else "qwen2.5-7b", device, dtype)
    length = min(args.length, 2048) if args.small else args.length
    totals = defaultdict(float)
    _timed(CompressedCache, "_flush", "flush (all)", totals, device)
    _timed(CompressedCache, "_raw_x", "raw x (gather + inverse RoPE)", totals, device)
    _timed(DeltaKVLayer, "keep_raw", "keep raw buffer", totals, device)
    _timed(core, "nearest_centers", "nearest centers", totals, device)
    _timed(core, "compress", "down projections", totals, device)
    _timed(core, "quantize", "quantize", totals, device)
    _timed(core, "_write_rows", "row writes", totals, device)
    _timed(core, "reference_from_fathers", "fathers' mean", totals, device)

    cache, _ = _make_cache(model, "deltakv", args.budget, length, args.steps,
                           overrides=[("deltakv", "kv_quant_bits", args.bits)]
                           + ([("deltakv", "full_attn_layers", "0")] if args.small else []))   # tiny: 4 layers
    ids = torch.randint(100, model.config.vocab_size - 100, (1, length), device=device)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        steps = []
        for i in range(args.steps):
            pos = torch.full((1, 1), length + i, device=device, dtype=torch.long)
            t = time.perf_counter()
            token = model(input_ids=token, position_ids=pos, past_key_values=cache,
                          use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - t)
    usage = sparse_hf.kv_usage(cache)
    by_part = defaultdict(int)
    for layer in cache.layers:
        parts = layer.bytes_by_part() if isinstance(layer, DeltaKVLayer) else {"filter layers (raw)": layer.allocated_bytes()}
        for key, value in parts.items():
            by_part[key] += value
    micro = _center_search_micro(length, device, dtype) if device.type == "cuda" else None
    print(json.dumps(dict(center_search_one_layer=micro,
        length=length, bits=args.bits, ttft_s=round(ttft, 3), flush_s=round(totals.pop("flush (all)"), 3),
        parts_s={k: round(v, 3) for k, v in totals.items()},
        decode_step_ms=round(1e3 * sorted(steps)[len(steps) // 2], 2) if steps else None,
        kv_ratio=round(usage.ratio, 4),
        kv_parts={k: round(v / usage.full_bytes, 4) for k, v in by_part.items() if v})))


if __name__ == "__main__":
    main()
