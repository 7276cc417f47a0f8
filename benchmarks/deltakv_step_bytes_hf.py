"""Bytes one HF-path DeltaKV static decode step moves, by op, at real context lengths, counted on the CPU.

    OMP_NUM_THREADS=1 TRITON_INTERPRET=1 python benchmarks/deltakv_step_bytes_hf.py --lengths 4096,32768,131072

The bench's DeltaKV cache (``sparse_hf.bench._make_cache``: budget 0.1 as a count, int4 latents, sinks 4, recent
64, ``plan_generation`` as ``deltakv+graph``) on a narrow Qwen2 with the 7B's attention shape (28 query heads, 4 KV
heads; ``--head-dim``, 32 by default to keep the prompt's center search cheap on a CPU) and 4 layers: 0 and 2 are
filter (observation) layers, 1 and 3 compressed. The prompt runs with the attention itself stubbed out (its output
does not matter for the bytes), then a few one-token decode steps take the CUDA branches on CPU tensors (Triton
interpreted, see ``count_deltakv_launches_hf.py``).

Bytes per op:

- aten ops (those that would launch a CUDA kernel, :data:`count_deltakv_launches.NO_LAUNCH` excluded): every input
  tensor read whole and every output written, except index ops, which read only what they fetch (``gather``,
  ``index``, ``index_select``: the index plus one output's worth; ``scatter``/``index_put``: the index plus the
  source). ``topk`` counts one pass over its input (a GPU radix select makes several, see the doc).
- Triton kernels: the bytes their masked loads and stores actually touch (the interpreter's
  ``create_masked_load``/``create_masked_store``, patched), so a kernel that gathers reads only its gathers.

Grouped by where they run: ``observer`` (a filter layer's attention and scores), ``pick`` (the per-observer
selection shared by the compressed layers after it: :meth:`CompressedCache._static_pick`), ``compressed`` (the
rest of a compressed layer's attention), ``model`` (everything else). Prints one ``BYTES`` JSON line per length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict

if __name__ == "__main__":      # a script run only: before sparse_hf.kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from count_deltakv_launches import NO_LAUNCH  # noqa: E402

GATHERS = {"gather", "index", "index_select", "take", "embedding"}
SCATTERS = {"scatter", "scatter_", "index_put", "index_put_", "index_copy", "index_copy_", "scatter_add_",
            "_index_put_impl_"}


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Bytes read and written per ``(bucket, op)``; Triton launches counted by :meth:`hook_interpreter`."""

    def __init__(self):
        super().__init__()
        self.bucket = "model"
        self.read: Counter = Counter()
        self.written: Counter = Counter()
        self.calls: Counter = Counter()
        self.inside_triton = 0
        self.kernel = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if self.inside_triton or name in NO_LAUNCH:
            return out
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        if name in ("to", "contiguous", "_to_copy", "clone") and args and out is args[0]:
            return out
        if name in GATHERS:
            idx = [t for t in ins[1:] if not t.is_floating_point()]
            r, w = sum(map(_nbytes, idx)) + sum(map(_nbytes, outs)), sum(map(_nbytes, outs))
        elif name in SCATTERS:
            r = sum(map(_nbytes, ins[1:]))
            w = sum(_nbytes(t) for t in ins[1:] if t.is_floating_point() or t.dtype == ins[0].dtype)
        elif name == "copy_":
            r, w = _nbytes(ins[1]), _nbytes(ins[0])
        else:
            r, w = sum(map(_nbytes, ins)), sum(map(_nbytes, outs))
        key = (self.bucket, name)
        self.read[key] += r
        self.written[key] += w
        self.calls[key] += 1
        return out

    def hook_interpreter(self) -> None:
        """Count each interpreted Triton launch, with the bytes its masked loads/stores touch."""
        from triton.runtime import interpreter as interp

        counter = self
        run = interp.InterpretedFunction.run

        def counted_run(fn, *a, **k):
            key = (counter.bucket, "triton " + getattr(fn.fn, "__name__", "kernel"))
            counter.calls[key] += 1
            counter.inside_triton += 1
            outer, counter.kernel = counter.kernel, key
            try:
                return run(fn, *a, **k)
            finally:
                counter.kernel = outer
                counter.inside_triton -= 1

        interp.InterpretedFunction.run = counted_run
        builder = interp.InterpreterBuilder
        load, store = builder.create_masked_load, builder.create_masked_store

        def masked_load(self, ptrs, mask, other, *a):
            ret = load(self, ptrs, mask, other, *a)
            if counter.kernel is not None:
                counter.read[counter.kernel] += int(mask.data.sum()) * ret.data.dtype.itemsize
            return ret

        def masked_store(self, ptrs, value, mask, *a):
            if counter.kernel is not None:
                counter.written[counter.kernel] += int(mask.data.sum()) * value.data.dtype.itemsize
            return store(self, ptrs, value, mask, *a)

        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store


def _stub_attention(module, query, key, value, attention_mask, **kwargs):
    """The prompt's attention, skipped: ``[B, q, H, D]`` zeros (the bytes of the decode step do not depend on it)."""
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None


def _nearest_by_position(x, centers, token_pos, center_pos, k, metric="l2", center_valid=None, **kwargs):
    """The prompt's center search, replaced by each token's latest visible center (``k`` times): the same shapes and
    dtype as :func:`~sparse_hf.deltakv.clustering.nearest_centers` without its ``N x M`` scores, which a CPU takes
    tens of minutes over at 128K. Which centers are fathers does not change a decode step's bytes."""
    key = center_pos if center_valid is None else center_pos.masked_fill(~center_valid, torch.iinfo(center_pos.dtype).max)
    last = (torch.searchsorted(key.contiguous(), token_pos.to(key.dtype).contiguous(), right=True) - 1).clamp_min(0)
    return last.unsqueeze(-1).expand(*last.shape, k).contiguous()


def measure(length: int, batch: int, head_dim: int, steps: int, budget: float, fast_flush: bool = False) -> dict:
    from transformers import AutoConfig

    import sparse_hf.deltakv.state as core
    import sparse_hf.hf.deltakv_cache as dc
    import sparse_hf.hf.selection_cache as sc
    from sparse_hf.bench import _case_cache
    from sparse_hf.hf.deltakv_cache import CompressedCache
    from sparse_hf.hf.deltakv_layer import DeltaKVLayer
    from transformers import AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=28, num_key_value_heads=4, head_dim=head_dim, vocab_size=256,
                                  rope_theta=1e6, max_position_embeddings=length + 64, rms_norm_eps=1e-6,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    overrides = [("deltakv", "kv_quant_bits", 4), ("deltakv", "full_attn_layers", "0,2")]
    cache, _ = _case_cache(model, "deltakv", budget, length, steps + 4, overrides, graph=True)
    counter = ByteCounter()
    counter.hook_interpreter()
    method = cache.method
    inner_attend, inner_pick = CompressedCache.attend, CompressedCache._static_pick

    def bucketed(self, module, *a, **k):
        i = module.layer_idx
        counter.bucket = ("observer" if method.is_observer(i) else "filter") if method.is_full(i) else "compressed"
        try:
            return inner_attend(self, module, *a, **k)
        finally:
            counter.bucket = "model"

    def pick(self, *a, **k):
        outer, counter.bucket = counter.bucket, "pick"
        try:
            return inner_pick(self, *a, **k)
        finally:
            counter.bucket = outer

    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    saved = dc.sdpa_attention_forward, sc.sdpa_attention_forward, core.nearest_centers
    dc.sdpa_attention_forward = sc.sdpa_attention_forward = _stub_attention
    if fast_flush:
        core.nearest_centers = _nearest_by_position
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        dc.sdpa_attention_forward, sc.sdpa_attention_forward, core.nearest_centers = saved
    from count_deltakv_launches_hf import force_gpu_branches
    force_gpu_branches()
    CompressedCache.attend, CompressedCache._static_pick = bucketed, pick
    compressed = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    read, written, calls, done, tries, pos = Counter(), Counter(), Counter(), 0, 0, length
    try:
        with torch.inference_mode():
            while done < steps and tries < 4 * steps:
                tries += 1
                before = [list(layer.state.counts) for layer in compressed]
                counter.read, counter.written, counter.calls = Counter(), Counter(), Counter()
                position = torch.full((batch, 1), pos, dtype=torch.long)
                with counter:
                    logits = model(input_ids=tok, position_ids=position, past_key_values=cache, use_cache=True).logits
                pos += 1
                tok = logits[:, -1].argmax(-1, keepdim=True)
                if tries == 1 or [list(layer.state.counts) for layer in compressed] != before:
                    continue                                         # the warm-up step, or a flush step
                if not all(layer.static_ok for layer in compressed):
                    raise RuntimeError("a compressed layer did not take the static decode path")
                read.update(counter.read)
                written.update(counter.written)
                calls.update(counter.calls)
                done += 1
    finally:
        CompressedCache.attend, CompressedCache._static_pick = inner_attend, inner_pick
    ops = defaultdict(dict)
    for key in set(read) | set(written):
        bucket, name = key
        ops[bucket][name] = dict(read=read[key] // done, written=written[key] // done, calls=calls[key] / done)
    layer = compressed[0]
    return dict(length=length, batch=batch, head_dim=head_dim, steps=done, fast_flush=fast_flush, picks=layer.scratch,
                compressed_capacity=layer.state.capacity, observers=len(method.obs_layers),
                compressed_layers=len(compressed), ops={b: dict(sorted(v.items())) for b, v in sorted(ops.items())})


def summarize(results: list[dict], top: int = 12) -> str:
    """A markdown table of ``results`` (``BYTES`` lines): MB per unit (an observer, a pick, a compressed layer, the
    model) of the ops whose bytes grow most with the length, at each length, and the growth in bytes per token."""
    units = {"observer": "observers", "pick": "observers", "compressed": "compressed_layers", "filter": None,
             "model": None}
    rows = defaultdict(dict)
    for r in results:
        for bucket, ops in r["ops"].items():
            n = r[units[bucket]] if units.get(bucket) else 1
            for name, v in ops.items():
                rows[(bucket, name)][r["length"]] = (v["read"] + v["written"]) / n
    lo, hi = min(r["length"] for r in results), max(r["length"] for r in results)
    slope = {k: (v.get(hi, 0) - v.get(lo, 0)) / (hi - lo) for k, v in rows.items()}
    lengths = sorted({r["length"] for r in results})
    head = "| per | op | " + " | ".join(f"MB at {n}" for n in lengths) + " | B per token |"
    lines = [head, "|" + "---|" * (len(lengths) + 3)]
    for key in sorted(slope, key=lambda k: -slope[k])[:top]:
        cells = " | ".join(f"{rows[key].get(n, 0) / 1e6:.2f}" for n in lengths)
        lines.append(f"| {key[0]} | {key[1]} | {cells} | {slope[key]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", help="print the table of a log of BYTES lines (no measurement)")
    p.add_argument("--lengths", default="4096,32768,131072")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--fast-flush", action="store_true", help="the prompt's fathers by position, not by the center "
                   "search (same shapes and decode bytes; minutes instead of an hour at 131072 on a CPU)")
    args = p.parse_args(argv)
    if args.summary:
        with open(args.summary) as f:
            print(summarize([json.loads(line.removeprefix("BYTES ")) for line in f if line.lstrip("BYTES ")[:1] == "{"]))
        return 0
    for length in [int(x) for x in args.lengths.split(",")]:
        print("BYTES " + json.dumps(measure(length, args.batch, args.head_dim, args.steps, args.budget, args.fast_flush)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
