"""Device launches of one engine DeltaKV decode step, counted on the CPU: what a CUDA step would launch.

    TRITON_INTERPRET=1 python benchmarks/count_deltakv_launches.py [--steps 2] [--top 25]    # ~2 minutes

The engine runs eagerly on the CPU with the layer structure of the Qwen2.5-7B shape (28 layers, 28/4 heads, the
default filter layers: 7 raw, 4 of them observation layers, 21 compressed) but narrow widths, and the attention
and rebuild kernels forced onto their Triton path (under the interpreter). Every aten op that would launch a CUDA
kernel (views, ``empty`` and other metadata ops excluded) counts one launch; each Triton kernel launch counts one,
and the aten ops the interpreter itself runs are not counted. Counts are grouped by where they happen (the
observation, raw filter and compressed layers' attention, and the rest of the model) and by op, per decode step
(steps with a flush are excluded: the flush is not part of the captured step). Prints one ``LAUNCHES`` JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from functools import partial

if __name__ == "__main__":      # a script run: before sparse_hf.kernels is imported. Never on import (tests import
    os.environ.setdefault("TRITON_INTERPRET", "1")   # this module: the variable would turn a GPU worker's kernels
    #                                                  into the interpreter's, run N+1's six GPU failures)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

#: aten ops that launch nothing on CUDA (views, metadata, allocation).
NO_LAUNCH = {"view", "_unsafe_view", "as_strided", "expand", "permute", "slice", "select", "unsqueeze", "squeeze",
             "t", "transpose", "reshape", "alias", "detach", "empty", "empty_strided", "new_empty", "resize_",
             "empty_like", "split", "split_with_sizes", "chunk", "unbind", "narrow", "lift_fresh", "_reshape_alias",
             "unfold",
             "is_nonzero", "item", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "dim", "size",
             "stride", "_to_copy_noop", "view_as_real", "view_as_complex", "diagonal", "clone_noop",
             "set_", "_has_compatible_shallow_copy_type", "result_type"}


class LaunchCounter(TorchDispatchMode):
    """Counts launching aten ops per ``bucket`` (an attribute the caller sets), and Triton launches via
    :meth:`triton_launch`; aten ops inside a Triton launch are the interpreter's own and are not counted."""

    def __init__(self):
        super().__init__()
        self.bucket = "model"
        self.counts: Counter = Counter()
        self.by_op: Counter = Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        no_op = name in ("to", "contiguous") and args and out is args[0]        # already the asked-for tensor
        if not self.inside_triton and name not in NO_LAUNCH and not no_op:
            self.counts[self.bucket] += 1
            self.by_op[f"{self.bucket}:{name}"] += 1
        return out

    def hook_interpreter(self) -> None:
        """Count every interpreted Triton launch as one launch of the current bucket (and not the torch ops the
        interpreter runs inside it): patches ``InterpretedFunction.run`` for the rest of the process."""
        from triton.runtime.interpreter import InterpretedFunction

        original_run = InterpretedFunction.run
        counter = self

        def counted_run(fn, *a, **k):
            counter.triton_launch(getattr(fn.fn, "__name__", "kernel"))
            counter.inside_triton += 1
            try:
                return original_run(fn, *a, **k)
            finally:
                counter.inside_triton -= 1

        InterpretedFunction.run = counted_run

    def triton_launch(self, kernel_name: str):
        self.counts[self.bucket] += 1
        self.by_op[f"{self.bucket}:triton {kernel_name}"] += 1


def narrow_7b_config():
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen2", hidden_size=448, intermediate_size=64, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, vocab_size=256, rope_theta=1e6,
                                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompt", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    from sparse_hf.deltakv import state as core
    from sparse_hf.engine import LLM, SamplingParams
    from sparse_hf.kernels import deltakv_rebuild_kv

    try:
        from bench_engine_deltakv import random_compressor
    except ImportError:                                      # run from the repository root
        from benchmarks.bench_engine_deltakv import random_compressor

    config = narrow_7b_config()
    torch.manual_seed(0)
    comp = random_compressor(config, torch.float32, torch.device("cpu"))
    llm = LLM(config, device="cpu", dtype=torch.float32, enforce_eager=True, sparse_method="deltakv",
              compressor=comp, num_sink_tokens=4, num_recent_tokens=16, num_top_tokens=64, num_kv_slots=4096,
              max_model_len=args.prompt + 4 * args.steps + 64, chunk_prefill_size=512)
    attention = llm.runner.attention
    attention.backend = "triton"
    core.deltakv_rebuild_kv = partial(deltakv_rebuild_kv, backend="triton")

    counter = LaunchCounter()
    counter.hook_interpreter()
    method = attention.method
    inner = attention._decode

    def bucketed(layer, g, q, scale):
        kind = ("observer" if method.is_observer(layer) else "filter") if method.is_full(layer) else "compressed"
        counter.bucket = kind
        try:
            return inner(layer, g, q, scale)
        finally:
            counter.bucket = "model"

    attention._decode = bucketed
    params = SamplingParams(temperature=0.0, max_tokens=4 * args.steps + 8, ignore_eos=True)
    llm.add_request("r0", torch.randint(0, config.vocab_size, (args.prompt,)).tolist(), params)
    while not llm.requests["r0"].output_token_ids:
        llm.step()
    llm.step()                                               # one warm-up decode step
    flushes = llm.runner.flush
    flushed = []
    llm.runner.flush = lambda rows: (flushed.append(bool(rows)), flushes(rows))[1]
    totals, ops, steps = Counter(), Counter(), 0
    while steps < args.steps:
        counter.counts, counter.by_op = Counter(), Counter()
        version = llm.pool.store.version
        with counter:
            llm.step()
        if llm.pool.store.version != version:                # a flush ran after this step: not a plain step
            continue
        totals.update(counter.counts)
        ops.update(counter.by_op)
        steps += 1
    per_step = {k: round(v / steps, 1) for k, v in sorted(totals.items())}
    per_step["total"] = round(sum(totals.values()) / steps, 1)
    top = [(name, round(n / steps, 1)) for name, n in ops.most_common(args.top)]
    print("LAUNCHES " + json.dumps(dict(steps=steps, per_step=per_step, top_ops=top)))
    llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
