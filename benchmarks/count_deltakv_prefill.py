"""Device launches and host syncs of DeltaKV's prompt (prefill + prompt-end compression) on the HF path, on the CPU.

    python benchmarks/count_deltakv_prefill.py [--batch 2] [--length 1024] [--top 30]      # ~1 minute

What ``sparse-hf bench --methods deltakv+graph --budgets 0.1 --knob deltakv:kv_quant_bits=4`` runs for its TTFT,
with the model narrowed: the Qwen2.5-7B layer structure (28 layers, 28/4 heads, the default filter layers: 7 raw, 4
of them observation layers, 21 compressed) at hidden 448, head_dim 16, fp32, a random latent compressor (a quarter
of ``concat(K, V)``, as the bench's), the cache made by the bench's own ``_make_cache`` and ``plan_generation``.
One forward of ``batch x length`` random tokens, counted with :class:`PrefillCounter`:

- **launches**: every aten op that would launch a CUDA kernel (views and metadata excluded; the engine's
  :class:`LaunchCounter`), grouped by where it runs: ``flush`` (a compressed layer's prompt-end compression,
  ``CompressedCache._flush``), ``compressed`` (the rest of a compressed layer's attention call), ``observer`` /
  ``filter`` (the raw layers' attention calls) and ``model`` (everything else);
- **syncs**: what makes the host wait for the device on CUDA, by kind: ``item`` (``.item()``, ``bool()``, ``int()``
  of a tensor), ``tolist``/``cpu``/``numpy`` (a device-to-host copy), ``upload`` (``torch.tensor`` of host data: a
  pageable host-to-device copy, which PyTorch follows with a stream sync), ``nonzero``/``masked_select``/
  ``bool-index`` (data-dependent output shapes).

Prints one ``PREFILL`` JSON line: totals per bucket, per compressed layer, and the most frequent ops of the
flush. ``--time`` times vanilla and deltakv prefills instead (:func:`time_prefill`), ``--cuda`` on a GPU with the
bench's model shape in bf16: the A/B of issue 12's TTFT (run it on both commits):

    python benchmarks/count_deltakv_prefill.py --cuda --cases 4096x8,32768x2,131072x1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import torch

if __name__ == "__main__" and "--cuda" not in sys.argv[1:]:   # counting on the CPU: the kernels' Triton path under
    os.environ.setdefault("TRITON_INTERPRET", "1")               # the interpreter; never set on import (a test does)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from count_deltakv_launches import LaunchCounter, narrow_7b_config  # noqa: E402

#: Tensor methods that read a device value back to the host (a sync on CUDA) without an aten op the CPU dispatches.
HOST_READS = ("tolist", "cpu", "numpy")
#: aten ops whose output shape depends on the data (a sync on CUDA).
DATA_SHAPED = {"nonzero": "nonzero", "masked_select": "masked_select", "unique_dim": "unique",
               "_unique2": "unique", "unique_consecutive": "unique"}


def _called_from(function: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _count(counter: LaunchCounter, func, args, kwargs, out) -> object:
    """:class:`LaunchCounter`'s rule for one op already run (``out``): not a view, metadata or no-op copy."""
    from count_deltakv_launches import NO_LAUNCH

    name = func.overloadpacket.__name__
    no_op = name in ("to", "contiguous") and args and out is args[0]
    if name not in NO_LAUNCH and not no_op:
        counter.counts[counter.bucket] += 1
        counter.by_op[f"{counter.bucket}:{name}"] += 1
    return out


class PrefillCounter(LaunchCounter):
    """:class:`LaunchCounter` plus host syncs (``self.syncs``: bucket -> Counter of kinds). Use as a context manager;
    it patches ``torch.Tensor``'s host reads while active."""

    def __init__(self):
        super().__init__()
        self.syncs: dict[str, Counter] = {}
        self._patched = []

    def _sync(self, kind: str) -> None:
        self.syncs.setdefault(self.bucket, Counter())[kind] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.inside_triton:
            return func(*args, **(kwargs or {}))
        if name == "_local_scalar_dense":
            self._sync("item")
        elif name == "lift_fresh":
            # host data to the device: host_ints' pinned non_blocking copy does not sync; torch.tensor(list,
            # device=cuda) does (a pageable copy, then a stream sync)
            if _called_from("host_ints"):
                self.counts[self.bucket] += 1
                self.by_op[f"{self.bucket}:upload (async)"] += 1
                return func(*args, **(kwargs or {}))
            self._sync("upload")
        elif name in DATA_SHAPED:
            self._sync(DATA_SHAPED[name])
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())
                if t is not None):
            self._sync("bool-index")
        out = func(*args, **(kwargs or {}))
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        if outs and all(t.numel() == 0 for t in outs):
            return out                     # an empty result launches no kernel on CUDA
        return _count(self, func, args, kwargs, out)

    def __enter__(self):
        counter = self
        for method in HOST_READS:
            original = getattr(torch.Tensor, method)

            def spy(self, *a, _name=method, _original=original, **k):
                counter._sync(_name)
                return _original(self, *a, **k)
            setattr(torch.Tensor, method, spy)
            self._patched.append((method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched:
            setattr(torch.Tensor, method, original)
        self._patched = []
        return super().__exit__(*exc)


def bench_cache(model, length: int, steps: int = 64, budget: float = 0.1, bits: int = 4, knobs=()):
    """The cache ``sparse-hf bench`` makes for ``deltakv+graph`` (its ``_make_cache`` and ``plan_generation``)."""
    from sparse_hf.bench import _make_cache

    overrides = [("deltakv", "kv_quant_bits", bits)] + [("deltakv", k, v) for k, v in knobs]
    cache, _ = _make_cache(model, "deltakv", budget, length, steps, overrides=overrides)
    cache.plan_generation(length, steps + 1)
    return cache


def count_prefill(model, cache, ids: torch.Tensor, counter: PrefillCounter | None = None,
                  attention_mask: torch.Tensor | None = None) -> PrefillCounter:
    """Run one prefill forward of ``ids [B, L]`` (and ``attention_mask``, e.g. left padding) through ``cache`` under a
    :class:`PrefillCounter` whose bucket follows the layer kind (see the module docstring). Returns the counter (with
    ``per_layer``: compressed layer -> flush launches)."""
    from sparse_hf.hf.deltakv_cache import CompressedCache

    counter = counter or PrefillCounter()
    method = cache.method
    attend, flush = CompressedCache.attend, CompressedCache._flush
    per_layer = Counter()

    def bucketed(self, module, *a, **k):
        i = module.layer_idx
        counter.bucket = ("observer" if method.is_observer(i) else "filter") if method.is_full(i) else "compressed"
        try:
            return attend(self, module, *a, **k)
        finally:
            counter.bucket = "model"

    def flushing(self, module, layer, *a, **k):
        before, counter.bucket = counter.counts["flush"], "flush"
        try:
            return flush(self, module, layer, *a, **k)
        finally:
            counter.bucket = "compressed"
            per_layer[module.layer_idx] += counter.counts["flush"] - before

    CompressedCache.attend, CompressedCache._flush = bucketed, flushing
    try:
        with torch.inference_mode(), counter:
            model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
    finally:
        CompressedCache.attend, CompressedCache._flush = attend, flush
    counter.per_layer = per_layer
    return counter


def time_prefill(model, batch: int, length: int, repeats: int, steps: int = 64, bits: int = 4) -> dict:
    """Wall time of ``repeats`` prefills of ``batch x length`` random tokens each with a vanilla ``DynamicCache`` and
    with the bench's ``deltakv+graph`` cache (alternating, after one cold run of each: the bench times one cold
    prefill per method, which on a GPU includes loading each kernel the first time it runs), synced on CUDA. The
    medians, the cold times and the ratios deltakv / vanilla."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.randint(100, model.config.vocab_size - 100, (batch, length), device=device)
    times = {"vanilla": [], "deltakv": []}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def once(kind):
        cache = DynamicCache(config=model.config) if kind == "vanilla" else bench_cache(model, length, steps, bits=bits)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        sync()
        return time.perf_counter() - t

    cold = {kind: once(kind) for kind in times}
    for _ in range(repeats):
        for kind in times:
            times[kind].append(once(kind))
    med = {kind: sorted(v)[len(v) // 2] for kind, v in times.items()}
    return dict(device=str(device), batch=batch, length=length, repeats=repeats,
                cold_s={k: round(v, 4) for k, v in cold.items()}, median_s={k: round(v, 4) for k, v in med.items()},
                ratio=round(med["deltakv"] / med["vanilla"], 4), cold_ratio=round(cold["deltakv"] / cold["vanilla"], 4))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--time", action="store_true", help="time vanilla vs deltakv prefills instead of counting")
    p.add_argument("--cuda", action="store_true", help="time on a GPU, the bench's model shape in bf16 (the A/B of "
                   "issue 12's TTFT; implies --time)")
    p.add_argument("--model", default="qwen2.5-7b", help="with --cuda: the bench's model shape")
    p.add_argument("--cases", default="4096x8,32768x2,131072x1", help="with --cuda: LENGTHxBATCH,...")
    p.add_argument("--repeats", type=int, default=5, help="with --time: timed prefills per method and case")
    args = p.parse_args(argv)

    if args.cuda:
        from sparse_hf.bench import build_model

        model = build_model(args.model, torch.device("cuda"), torch.bfloat16)
        for case in args.cases.split(","):
            length, batch = (int(v) for v in case.split("x"))
            print("TTFT " + json.dumps(time_prefill(model, batch, length, args.repeats, bits=args.bits)), flush=True)
            torch.cuda.empty_cache()
        return 0

    from transformers import AutoModelForCausalLM

    config = narrow_7b_config()
    config.max_position_embeddings = max(config.max_position_embeddings, args.length + 128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    if args.time:
        print("TTFT " + json.dumps(time_prefill(model, args.batch, args.length, args.repeats, bits=args.bits)))
        return 0
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    cache = bench_cache(model, args.length, bits=args.bits)
    t = time.perf_counter()
    counter = count_prefill(model, cache, ids)
    wall = time.perf_counter() - t
    layers = sorted(counter.per_layer)
    flush_ops = Counter({k.split(":", 1)[1]: v for k, v in counter.by_op.items() if k.startswith("flush:")})
    print("PREFILL " + json.dumps(dict(
        batch=args.batch, length=args.length, compressed_layers=len(layers),
        launches={k: v for k, v in sorted(counter.counts.items())},
        flush_launches_per_layer=sorted(set(counter.per_layer.values())),
        syncs={k: dict(v) for k, v in sorted(counter.syncs.items())},
        flush_syncs_per_layer=round(sum(counter.syncs.get("flush", {}).values()) / max(1, len(layers)), 2),
        counted_wall_s=round(wall, 2), flush_top_ops=flush_ops.most_common(args.top))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
