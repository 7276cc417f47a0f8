"""Device launches of one HF-path DeltaKV static decode step (what ``deltakv+graph`` captures), counted on the CPU.

    TRITON_INTERPRET=1 python benchmarks/count_deltakv_launches_hf.py [--steps 3] [--top 30]    # ~1 minute

The HF path's GPU branches are taken on the CPU: ``kernels_run_fused`` answers True and every kernel entry point
runs its Triton kernel under the interpreter, so the ops counted are the ones a CUDA step launches. The model has
the layer structure of the Qwen2.5-7B shape (28 layers, 28/4 heads, the default filter layers: 7 raw, 4 of them
observation layers, 21 compressed) with narrow widths, a random latent compressor and int4 latents. Every aten op
that would launch a CUDA kernel counts one launch (views and metadata excluded), each Triton launch counts one,
and the aten ops the interpreter itself runs are not counted (:class:`LaunchCounter` of
``count_deltakv_launches.py``, the engine's counter). Counts are grouped by the layer kind whose attention runs
(``observer``, ``filter``, ``compressed``) and ``model`` (everything else), per decode step; steps with a flush
are excluded (the flush runs after a replayed step, outside the graph). Prints one ``LAUNCHES`` JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

if __name__ == "__main__":      # a script run only (see count_deltakv_launches.py): before sparse_hf.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from count_deltakv_launches import LaunchCounter, narrow_7b_config  # noqa: E402


def force_gpu_branches() -> None:
    """Make the HF path and the kernel entry points take their CUDA branches for CPU tensors (interpreted Triton)."""
    from sparse_hf.kernels import dispatch

    original, original_fused = dispatch.use_triton, dispatch.kernels_run_fused

    def use_triton(backend, kernel, *tensors):
        if backend == "auto" and dispatch.HAS_TRITON and dispatch.is_interpreted(kernel):
            backend = "triton"
        return original(backend, kernel, *tensors)

    def fused(t):
        return t.dtype in dispatch.TRITON_DTYPES

    for name, mod in list(sys.modules.items()):
        if mod is None or not (name.startswith("sparse_hf") or name.startswith("kernels")):
            continue
        if getattr(mod, "use_triton", None) is original:
            mod.use_triton = use_triton
        if getattr(mod, "kernels_run_fused", None) is original_fused:
            mod.kernels_run_fused = fused
    from sparse_hf.hf import layer as slot_layer        # its CPU call asks for the torch path by name
    append = slot_layer.append_kv
    slot_layer.append_kv = lambda *a, backend="auto", **k: append(*a, backend="triton", **k)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompt", type=int, default=300)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--full-attn-layers", default=None, help="filter layers, e.g. 0,3,15,21 (default: the method's)")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    import sparse_hf
    from sparse_hf.deltakv import DeltaKVCompressor
    from sparse_hf.hf.deltakv_cache import CompressedCache
    from sparse_hf.hf.deltakv_layer import DeltaKVLayer

    force_gpu_branches()
    config = narrow_7b_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    comp = DeltaKVCompressor.for_model(config, kv_compressed_size=2 * 4 * 16 // 4)
    new_tokens = 8 * args.steps + 16
    cache = sparse_hf.build_cache("deltakv", config, dict(compressor=comp, num_sink_tokens=4, num_recent_tokens=16,
                                                           num_top_tokens=64, kv_quant_bits=4, cuda_graph=False,
                                                           **({"full_attn_layers": args.full_attn_layers}
                                                              if args.full_attn_layers else {})))
    cache.plan_generation(args.prompt, new_tokens)
    sparse_hf.prepare_model(model)

    counter = LaunchCounter()
    counter.hook_interpreter()
    method = cache.method
    inner = CompressedCache.attend

    def bucketed(self, module, *a, **k):
        i = module.layer_idx
        counter.bucket = ("observer" if method.is_observer(i) else "filter") if method.is_full(i) else "compressed"
        try:
            return inner(self, module, *a, **k)
        finally:
            counter.bucket = "model"

    CompressedCache.attend = bucketed
    ids = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        length = args.prompt
        compressed = [layer for layer in cache.layers if isinstance(layer, DeltaKVLayer)]
        totals, ops, steps, tries = Counter(), Counter(), 0, 0
        while steps < args.steps and tries < 8 * args.steps:
            tries += 1
            before = [list(layer.state.counts) for layer in compressed]
            counter.counts, counter.by_op = Counter(), Counter()
            pos = torch.full((1, 1), length, dtype=torch.long)
            with counter:
                logits = model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits
            length += 1
            tok = logits[:, -1].argmax(-1, keepdim=True)
            if tries == 1 or [list(layer.state.counts) for layer in compressed] != before:
                continue                                     # the warm-up step, or a step that flushed
            if not all(layer.static_ok for layer in compressed):
                raise RuntimeError("a compressed layer did not take the static decode path")
            totals.update(counter.counts)
            ops.update(counter.by_op)
            steps += 1
    per_step = {k: round(v / steps, 1) for k, v in sorted(totals.items())}
    per_step["total"] = round(sum(totals.values()) / steps, 1)
    top = [(name, round(n / steps, 1)) for name, n in ops.most_common(args.top)]
    print("LAUNCHES " + json.dumps(dict(path="hf", steps=steps, per_step=per_step, top_ops=top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
