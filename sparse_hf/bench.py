"""``sparse-hf bench``: TTFT, prefill and decode throughput, memory and roofline, side by side with HF.

Every (case, method, budget) runs in one process on one model: HF vanilla (``DynamicCache``), HF's best
(``StaticCache`` + explicitly chosen SDPA backends + ``torch.compile(mode="reduce-overhead")``) and our
methods. Decode is a greedy loop of model calls (what ``generate`` runs), timed per step with a device
sync; the median steady step is reported. The roofline is one step's bytes (weights + KV read) over the
copy bandwidth measured once per run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from pathlib import Path

import torch

from .bench_cli import BASELINES, SHAPES, check_methods, parse_budgets, parse_cases  # noqa: F401  (parse_cases re-exported)
from .deltakv.compressor import model_kv_shape
from .hf.compat import cache_argument

DELTAKV_LATENT_FRACTION = 4   # latent = concat(K, V) dim / 4, as the reference's 7B compressor (256 of 1024)


def budget_config(method: str, fraction: float, length: int) -> dict:
    """Knobs that make ``method`` read about ``fraction`` of a ``length``-token prompt per sparse layer: the
    method's own rule (``knobs_for_budget``), the same one eval and the CLI use."""
    from .methods import get_method

    return get_method(method).knobs_for_budget(fraction, length)


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write), the decode roofline's denominator."""
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return 2 * x.numel() / seconds


def build_model(shape_or_path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape_or_path in SHAPES:
        knobs = dict(SHAPES[shape_or_path])
        config = AutoConfig.for_model(knobs.pop("model_type"), **knobs)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        from .models import load_model
        model, _ = load_model(shape_or_path, dtype=dtype, device=str(device))
    return model.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make_cache(model, method, budget, length, steps, overrides=()):
    from transformers import DynamicCache, StaticCache

    from . import build_cache, prepare_model

    cfg = model.config
    if method == "vanilla":
        return DynamicCache(config=cfg), {}
    if method == "hf-best":
        return StaticCache(config=cfg, max_cache_len=length + steps + 8), {}
    knobs = budget_config(method, budget, length)
    knobs.update({key: value for m, key, value in overrides if m == method})   # --knob METHOD:KEY=VALUE
    if method == "deltakv":   # speed does not depend on the weights: a random compressor of the usual shape
        from .deltakv import DeltaKVCompressor
        torch.manual_seed(0)
        param = next(model.parameters())
        _, kv_heads, head_dim = model_kv_shape(cfg)
        latent = 2 * kv_heads * head_dim // DELTAKV_LATENT_FRACTION
        comp = DeltaKVCompressor.for_model(cfg, kv_compressed_size=latent).to(param.device, param.dtype)
        knobs = dict(knobs, compressor=comp)
    # CUDA graphs are the bench's own choice (``+graph`` drives a GraphDecoder), never the cache's automatic mode
    cache = build_cache(method, cfg, dict(knobs, cuda_graph=False))
    cache.prefill_target = length
    cache.set_reserve(steps + 1)
    prepare_model(model)
    return cache, knobs


def _case_cache(model, method, budget, length, steps, overrides, graph):
    """The cache one case prefills into (the timed run and its warm-up build theirs here, the same way)."""
    cache, knobs = _make_cache(model, method, budget, length, steps, overrides)
    if graph and hasattr(cache, "plan_generation"):   # DeltaKV: reserve for every step, so flushes keep the graph
        cache.plan_generation(length, steps + 1)
    return cache, knobs


def _prefill(model, ids, cache, method, device) -> tuple[torch.Tensor, float]:
    """One forward over the whole ``(batch, length)`` prompt ``ids`` into ``cache``, the last position's logits
    only; returns the greedy next token ``(batch, 1)`` and the wall seconds to it (synced on both sides): TTFT."""
    _sync(device)
    t0 = time.perf_counter()
    extra = dict(cache_position=torch.arange(ids.shape[1], device=device)) if method == "hf-best" else {}
    extra[cache_argument(model.forward)] = cache
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return token, time.perf_counter() - t0


@torch.inference_mode()
def run_case(model, device, length, batch, method, budget, steps, bandwidth, overrides=(), warm_prefill=True):
    """Prefill ``batch`` random prompts of ``length`` tokens, then ``steps`` greedy decode steps.

    ``warm_prefill``: first run the same prefill (same method, budget, knobs and ``(batch, length)`` ids, a cache
    of its own, thrown away) untimed, so that TTFT excludes what only the first prefill of a shape in the process
    pays: cuDNN/cuBLAS plan selection at this shape, Triton JIT at its specialisations, the caching allocator
    growing to this shape's activations (the cache is not emptied between the two). Run O (H200, 4096 x 8) read
    the first method of a process at ~2x the TTFT of the same method run again (1.89 s, then 0.91 s) although the
    bench had warmed every method at 512 x 8: the cost belongs to the shape, not to the method. The warm-up's time
    is reported as ``ttft_first_s``; the peak memory and KV bytes are the timed run's.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .usage import kv_usage

    cfg = model.config
    graph = method.endswith("+graph")
    method = method.removesuffix("+graph")
    if method in BASELINES and model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    ids = torch.randint(100, cfg.vocab_size - 100, (batch, length), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    forward = model
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    if method == "hf-best" and device.type == "cuda":
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with sdpa_kernel(backends) if method == "hf-best" else contextlib.nullcontext():
        ttft_first = None
        if warm_prefill:
            warm_cache, _ = _case_cache(model, method, budget, length, steps, overrides, graph)
            _, ttft_first = _prefill(model, ids, warm_cache, method, device)
            del warm_cache
            gc.collect()   # a cache in a reference cycle would otherwise hold its memory through the timed run
        cache, knobs = _case_cache(model, method, budget, length, steps, overrides, graph)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        token, ttft = _prefill(model, ids, cache, method, device)
        times = []
        decoder = None
        if graph:
            from .hf.cuda_graph import GraphDecoder
            decoder = GraphDecoder(model, cache)
        for i in range(steps):
            pos = torch.full((batch, 1), length + i, device=device, dtype=torch.long)
            extra = dict(cache_position=pos[0]) if method == "hf-best" else {}
            _sync(device)
            t = time.perf_counter()
            if decoder is not None:
                logits = decoder.step(token, pos)
            else:
                extra[cache_argument(model.forward)] = cache
                logits = forward(input_ids=token, position_ids=pos, use_cache=True, **extra).logits[:, -1]
            token = logits.argmax(-1, keepdim=True).clone()
            _sync(device)
            times.append(time.perf_counter() - t)
    warm = times[min(len(times) - 1, 6 if method == "hf-best" or graph else 2):]
    step = sorted(warm)[len(warm) // 2]
    n_params = sum(p.numel() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    weight_bytes = n_params * elem
    _, kv_heads, head_dim = model_kv_shape(cfg)
    token_bytes = 2 * kv_heads * head_dim * elem
    read_tokens = _tokens_read_per_step(cache, method, length, batch, cfg.num_hidden_layers)
    result = dict(method=method + ("+graph" if graph else ""), budget=None if method in BASELINES else budget, L=length, B=batch,
                  ttft_s=round(ttft, 4), **({"ttft_first_s": round(ttft_first, 4)} if warm_prefill else {}),
                  prefill_tok_s=round(batch * length / ttft, 1),
                  decode_step_ms=round(step * 1e3, 3), decode_tok_s=round(batch / step, 2),
                  itl_ms=round(step * 1e3, 3),
                  decode_mean_step_ms=round(sum(warm) / len(warm) * 1e3, 3),   # counts re-captures / eager steps
                  knobs={k: v for k, v in knobs.items() if isinstance(v, (int, float, str))})
    if hasattr(cache, "method"):
        usage = kv_usage(cache)
        result.update(kv_bytes=usage.bytes, kv_full_bytes=usage.full_bytes, kv_ratio=round(usage.ratio, 4),
                      **({"kv_host_bytes": usage.host_bytes} if usage.host_bytes else {}))
    else:
        result.update(kv_bytes=batch * (length + steps) * token_bytes * cfg.num_hidden_layers, kv_ratio=1.0)
    if device.type == "cuda":
        result["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    if bandwidth:
        floor = (weight_bytes + read_tokens * token_bytes) / bandwidth
        result.update(roofline_step_ms=round(floor * 1e3, 3), frac_of_roofline=round(floor / step, 3))
    del cache
    return result


def _tokens_read_per_step(cache, method, length, batch, num_layers) -> int:
    """KV tokens one decode step reads, summed over layers and rows."""
    if not hasattr(cache, "layers") or method in BASELINES:
        return batch * length * num_layers
    if getattr(cache, "selection", None) is not None and hasattr(cache.method, "full_layers"):
        full = len(cache.method.full_layers)
        selected = int(cache.selection[1].sum())
        return full * batch * length + (num_layers - full) * selected
    return sum(layer.num_slots * batch for layer in cache.layers)


def warm_up(model, device, methods, batches, fraction, bandwidth) -> None:
    """Before a grid's timed cases: library init (vanilla, 128 x 1), then each sparse method at 512 tokens and every
    batch size of the grid (``fraction`` of the prompt kept), so its decode kernels compile (Triton JIT specialises
    integer arguments equal to 1) and its graphs capture outside the timed steps. TTFT is warmed by :func:`run_case`
    itself at each case's exact shape: a 512-token warm-up did not cover it (run O: the first method's TTFT at
    4096 x 8 read ~2x its second run in the same process)."""
    run_case(model, device, 128, 1, "vanilla", None, 4, bandwidth, warm_prefill=False)
    for batch in sorted(set(batches)):
        for method in methods:
            if method not in BASELINES:
                try:
                    run_case(model, device, 512, batch, method, fraction, 4, bandwidth, warm_prefill=False)
                except Exception:  # the timed run reports the error
                    pass


def run_bench(model_name: str, methods, budgets, cases, steps=24, device=None, dtype=None, output=None,
              plot=None, log=print, knob_overrides=()) -> list[dict]:
    """Run the grid and return one dict per (case, method, budget); write JSON and a plot if asked.

    ``knob_overrides``: ``[(method, key, value), ...]`` set after the method's budget rule (``--knob``)."""

    budgets = parse_budgets(budgets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    methods = check_methods(methods, device.type == "cuda")     # unknown names, +graph off CUDA: ValueError
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bandwidth = copy_bandwidth(device)
    model = build_model(model_name, device, dtype)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               model=model_name, date=time.strftime("%Y-%m-%d"),
               copy_bw_TBps=round(bandwidth / 1e12, 3) if bandwidth else None)
    import transformers
    env["transformers"] = transformers.__version__
    log("ENV " + json.dumps(env))
    warm_up(model, device, methods, [b for _, b in cases], min(budgets), bandwidth)
    results = []
    for length, batch in cases:
        for method in methods:
            for budget in ([None] if method in BASELINES else budgets):
                try:
                    r = run_case(model, device, length, batch, method, budget, steps, bandwidth, knob_overrides)
                except torch.OutOfMemoryError:
                    r = dict(method=method, budget=budget, L=length, B=batch, error="OOM")
                except Exception as e:  # keep going: one failing cell must not lose the grid
                    r = dict(method=method, budget=budget, L=length, B=batch, error=f"{type(e).__name__}: {e}"[:400])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                _add_ratios(r, results)
                results.append(r)
                log("RESULT " + json.dumps(r))
    if output:
        Path(output).write_text(json.dumps(dict(env=env, results=results), indent=1))
    if plot:
        from .bench_report import plot_bench
        plot_bench(results, plot)
    return results


def _add_ratios(r: dict, done: list[dict]) -> None:
    for base in BASELINES:
        ref = next((x for x in done if x["method"] == base and x["L"] == r["L"] and x["B"] == r["B"]
                    and "decode_tok_s" in x), None)
        if ref and "decode_tok_s" in r:
            r[f"decode_x_{base}"] = round(r["decode_tok_s"] / ref["decode_tok_s"], 2)
            r[f"ttft_x_{base}"] = round(r["ttft_s"] / ref["ttft_s"], 3)
