"""Engine DeltaKV against engine vanilla: decode tok/s, TTFT, peak memory and the KV bytes each holds.

    python benchmarks/bench_engine_deltakv.py [--cases 32768x2,131072x1] [--budget 2048] [--new-tokens 64]
    python benchmarks/bench_engine_deltakv.py --small     # CPU smoke run
    python benchmarks/bench_engine_deltakv.py --longest-prompt   # CPU: longest prompt at batch 1 from the layout
    python benchmarks/bench_engine_deltakv.py --tensor-parallel-size 2 [--tp-selection per_rank]   # two GPUs (issue 15)

Random weights in the Qwen2.5-7B shape, bf16 on the GPU, and a random DeltaKV compressor of the usual shape
(latent = concat(K, V) / 4: 256 for the 7B shape), as ``sparse_hf.bench`` builds it (speed does not depend on the
weights). Cases and timing are :func:`bench_engine.run_case`'s; one JSON line per case, plus the KV bytes held
after the prompt (raw slots of every layer, and for DeltaKV its latents, centers, father ids and positions), and the
longest prompt one row could hold in the same KV memory (vanilla; deltakv with chunked and layer-wise prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_engine import engine_config, run_case  # noqa: E402

from sparse_hf.bench import DELTAKV_LATENT_FRACTION, budget_config, copy_bandwidth, parse_cases  # noqa: E402
from sparse_hf.engine import LLM  # noqa: E402


def random_compressor(config, dtype, device):
    from sparse_hf.deltakv import DeltaKVCompressor
    from sparse_hf.deltakv.compressor import model_kv_shape

    _, kv_heads, head_dim = model_kv_shape(config)
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(config, kv_compressed_size=2 * kv_heads * head_dim // DELTAKV_LATENT_FRACTION)
    return comp.to(device, dtype)


def kv_bytes(llm) -> dict:
    """Bytes of KV the engine holds now: raw slots in use (all layers) and the compressed store."""
    pool = llm.pool
    raw = pool.used_slots() * pool.bytes_per_slot() // pool.num_layers
    side = getattr(pool, "pre_norm_k", {})          # Qwen3: the pre-norm keys of the compressed layers' slots in use
    if side:
        raw += (pool.group_slots[1] - pool.free_top[1]) * sum(t[0].numel() * t.element_size() for t in side.values())
    store = getattr(pool, "store", None)
    return dict(raw_kv_bytes=raw, compressed_bytes=store.nbytes() if store is not None else 0)


def longest_prompt_at_batch_1(llm) -> dict:
    """The longest prompt one row could hold in this engine's KV memory: every slot for vanilla; for deltakv
    :func:`~sparse_hf.engine.deltakv_store.longest_prompt` of the memory its two slot groups (and the layer-wise
    staging it reserves) take, with chunked prefill and with layer-wise prefill (hidden states on the device, and in
    host memory)."""
    pool = llm.pool
    if not hasattr(pool, "store"):
        return dict(longest_prompt_b1=pool.group_slots[0])
    from sparse_hf.engine.deltakv_store import layerwise_bytes_per_token, runs_layerwise, slot_costs

    runner, cfg = llm.runner, llm.config
    args = (runner.method, runner.projections, pool.num_kv_heads, pool.head_dim, pool.k[0].dtype)
    pre_norm = bool(pool.pre_norm_k)                  # Qwen3: the compressed layers' slots hold pre-norm keys too
    per_filter, per_compressed, _ = slot_costs(*args, pre_norm)
    budget = pool.group_slots[0] * per_filter + pool.group_slots[1] * per_compressed
    if runs_layerwise(cfg.deltakv_prefill, llm.max_model_len):
        budget += llm.max_model_len * layerwise_bytes_per_token(*args[2:], pre_norm, llm.model.config.hidden_size,
                                                                llm.dtype, cfg.layerwise_hidden_on_host)
    return longest_prompts(int(budget), *args, pre_norm, llm.model.config.hidden_size, llm.dtype)


def longest_prompts(budget, method, projections, kv_heads, head_dim, kv_dtype, pre_norm, hidden_size, dtype) -> dict:
    """Longest prompt at batch 1 in ``budget`` bytes: chunked, layer-wise (hidden states on the device), layer-wise
    with ``layerwise_hidden_on_host``."""
    from sparse_hf.engine.deltakv_store import layerwise_bytes_per_token, longest_prompt

    args = (budget, method, projections, kv_heads, head_dim, kv_dtype, pre_norm)
    out = dict(longest_prompt_b1=longest_prompt(*args))
    for key, host in (("longest_prompt_b1_layerwise", False), ("longest_prompt_b1_layerwise_host", True)):
        per_token = layerwise_bytes_per_token(kv_heads, head_dim, kv_dtype, pre_norm, hidden_size, dtype, host)
        out[key] = longest_prompt(*args, layerwise_per_token=per_token)
    return out


def layout_report(shape: str, vanilla_slots: int, bits: int, offload: bool = False, full_attn_layers=None) -> dict:
    """The longest prompts at batch 1 for ``shape``'s layout (bf16, ``full_attn_layers`` or the default filter
    layers, a latent-256-style
    compressor: concat(K, V) / 4; latents of ``bits``, in host memory with ``offload``) in the KV memory of
    ``vanilla_slots`` vanilla slots, computed on the CPU from the layout alone (the compressor on the meta device)."""
    from sparse_hf.deltakv import DeltaKVCompressor
    from sparse_hf.deltakv.compressor import model_kv_shape
    from sparse_hf.engine.config import build_method

    config = engine_config(shape)
    layers, kv_heads, head_dim = model_kv_shape(config)
    with torch.device("meta"):
        comp = DeltaKVCompressor.for_model(config, kv_compressed_size=2 * kv_heads * head_dim
                                           // DELTAKV_LATENT_FRACTION).to(torch.bfloat16)
    knobs = dict(compressor=comp, kv_quant_bits=bits, offload_latents=offload)
    if full_attn_layers is not None:
        knobs["full_attn_layers"] = full_attn_layers
    method = build_method("deltakv", knobs, layers)
    budget = vanilla_slots * (2 * layers * kv_heads * head_dim * 2 + 4)
    got = longest_prompts(budget, method, comp.projections, kv_heads, head_dim, torch.bfloat16, False,
                          config.hidden_size, torch.bfloat16)
    ratios = {k.replace("longest_prompt_b1", "x_vanilla"): round(v / vanilla_slots, 3) for k, v in got.items()}
    return dict(shape=shape, kv_quant_bits=bits, offload_latents=offload, vanilla=vanilla_slots,
                compressed_layers=len(method.sparse_layers()), **got, **ratios)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--cases", default="32768x2,131072x1")
    p.add_argument("--methods", default="vanilla,deltakv")
    p.add_argument("--budget", type=int, default=2048, help="tokens a sparse layer reads per decode step")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--chunk-prefill-size", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--kv-quant-bits", type=int, default=0, choices=(0, 8, 4), help="deltakv latents: 0, int8, int4")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shape, short cases")
    p.add_argument("--longest-prompt", action="store_true",
                   help="only print the longest prompt at batch 1 (vanilla, chunked, layer-wise) for the shape's "
                        "layout with bf16, int8 and int4 latents (and offloaded int4 ones), computed on the CPU")
    p.add_argument("--vanilla-slots", type=int, default=1_900_000,
                   help="--longest-prompt: the KV memory as vanilla slots (1.9M: an H200's 7B pool)")
    p.add_argument("--deltakv-prefill", default="auto", choices=("auto", "chunked", "layerwise"))
    p.add_argument("--layerwise-hidden-on-host", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks splitting the heads (one GPU each)")
    p.add_argument("--tp-selection", default="exact", choices=["exact", "per_rank"],
                   help="deltakv's pick under TP: scores all-reduced (exact) or each rank's own heads")
    p.add_argument("--full-attn-layers", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="deltakv's filter layers (raw, read in full), e.g. 0,3,15,21; default: the method's")
    args = p.parse_args(argv)
    if args.longest_prompt:
        for bits, offload in ((0, False), (8, False), (4, False), (4, True)):
            print(json.dumps(layout_report(args.shape, args.vanilla_slots, bits, offload, args.full_attn_layers)),
                  flush=True)
        return 0
    extra = {}
    if args.small:
        args.shape, args.cases, args.new_tokens, args.budget, args.chunk_prefill_size = "tiny", "96x2,160x1", 4, 48, 64
        extra = dict(device="cpu", num_kv_slots=1024)
    cases = parse_cases(args.cases)
    config = engine_config(args.shape)
    longest = max(length for length, _ in cases)
    device = torch.device(extra.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device)
    for method in args.methods.split(","):
        knobs = {} if method == "vanilla" else budget_config(method, args.budget / longest, longest)
        if method == "deltakv" and args.kv_quant_bits:
            knobs["kv_quant_bits"] = args.kv_quant_bits
        shown = dict(knobs)
        if method == "deltakv" and args.small:
            knobs["full_attn_layers"] = shown["full_attn_layers"] = [0]      # the tiny shape has 4 layers
        elif method == "deltakv" and args.full_attn_layers is not None:
            knobs["full_attn_layers"] = shown["full_attn_layers"] = args.full_attn_layers
        if method == "deltakv":
            knobs["compressor"] = random_compressor(config, dtype, device)
            extra_dk = dict(deltakv_prefill=args.deltakv_prefill,
                            layerwise_hidden_on_host=args.layerwise_hidden_on_host)
            shown.update(extra_dk)
        tp = dict(tensor_parallel_size=args.tensor_parallel_size,       # tp_selection: a sparse method's knob
                  **({"tp_selection": args.tp_selection} if method != "vanilla" else {}))
        llm = LLM(config, max_model_len=longest + args.new_tokens + 8, max_num_seqs=max(b for _, b in cases),
                  max_num_batched_tokens=max(args.chunk_prefill_size, 2048), chunk_prefill_size=args.chunk_prefill_size,
                  gpu_memory_utilization=args.gpu_memory_utilization, dtype=dtype,
                  sparse_method=None if method == "vanilla" else method, **knobs, **extra, **tp,
                  **(extra_dk if method == "deltakv" else {}))
        weight_bytes = sum(t.numel() * t.element_size() for t in llm.model.parameters())
        for batch in sorted({b for _, b in cases}):         # warm-up: kernels and graphs of each batch size
            run_case(llm, min(128, longest), batch, 4, None, weight_bytes)
        held = {}
        step = llm.step

        def step_and_measure():                      # the KV held right after each request's prompt
            outs = step()
            for o in outs:
                if len(o.token_ids) == 1:
                    held.update(kv_bytes(llm))
            return outs

        llm.step = step_and_measure
        for length, batch in cases:
            held.clear()
            r = run_case(llm, length, batch, args.new_tokens, bandwidth, weight_bytes)
            groups = llm.pool.group_slots
            # rows of 131072 tokens the pool holds after their prompts (deltakv: its filter group bounds it)
            r.update(method=method, knobs=shown, **tp, group_slots=groups, rows_at_128k=groups[0] // 131072,
                     **longest_prompt_at_batch_1(llm), **held)
            graphs = llm.runner.graphs
            if method == "deltakv" and graphs is not None:          # captured decode, or why not
                r.update(graph_captures=graphs.captures, graph_failed=graphs.failed)
            del graphs      # (held past close(), it pinned the engine's pool: run N's "only 0 KV slots fit")
            print(json.dumps(r), flush=True)
        llm.check_pool_whole()
        llm.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
