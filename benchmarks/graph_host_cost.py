"""Host time of :class:`GraphDecoder`'s per-step work around a replay, for snapkv and deltakv, on any device: a 28-layer
Qwen2 model of tiny width (the Qwen2.5-7B layer count; the host work grows with layers, not width), prefilled with
``--length`` random tokens.

    python benchmarks/graph_host_cost.py --length 2048

Prints, per method, the median milliseconds of each host part of a replayed step (of the quietest of ``--rounds``
rounds: see :func:`quiet_median_ms`), in ``GraphDecoder.step``'s order:

- before the replay (on the GPU the device waits for these; ``host_ms`` of ``profile_hf_graph.py`` is mostly them):
  the room check, the buffer signature (built and compared with the one taken at the "capture"), the inputs' copy
  into the static buffers;
- after the replay (on the GPU they overlap the graph's device work while they take less than it): the host counters'
  advance, the layers' maintenance;
- ``step``: the whole :meth:`GraphDecoder.step` with the replay a no-op (the decoder's graph replaced, its input made
  to look like a CUDA tensor; the layers' host counters put back after each step, outside the timing), which is
  what a replayed step costs the host besides the replay; and the torch ops ``step`` issues, all of them and those
  that are not views (each of those a kernel launch on the GPU, ~5-10 us of host time there).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def median_ms(fn, n: int, after=None) -> float:
    """Median wall milliseconds of ``fn()`` over ``n`` calls; ``after()`` (untimed) runs after each call."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return statistics.median(times) * 1e3


def quiet_median_ms(parts: dict, n: int, rounds: int, after=None) -> dict:
    """``{name: ms}``: each part's median over ``n`` calls in each of ``rounds`` rounds (the parts take turns), the
    lowest round's. On a CPU shared with other jobs a round's median moves by 2x with their load; the quietest
    round is the reproducible number."""
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(rounds):
        for name, fn in parts.items():
            best[name] = min(best[name], median_ms(fn, n, after))
    return best


class OpCount(TorchDispatchMode):
    """Counts the aten ops run under it: ``ops`` all of them, ``kernels`` those that are not views (on the GPU each
    is a launch)."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


class NoReplay:
    """A captured graph stand-in whose replay does nothing (the host work around it is what is timed)."""

    def replay(self):
        pass


class OnDevice(torch.Tensor):
    """A CPU tensor that reports ``is_cuda``, so that :meth:`GraphDecoder.step` takes its replay path on CPU."""

    is_cuda = property(lambda self: True)
    __torch_function__ = torch._C._disabled_torch_function_impl


def replay_ready(decoder, token: torch.Tensor, vocab: int) -> None:
    """Put ``decoder`` in the state a capture leaves (static buffers, signature) with a no-op graph."""
    decoder.static_ids = torch.zeros_like(token)
    decoder.static_pos = torch.zeros_like(token)
    decoder.static_logits = torch.zeros(token.shape[0], 1, vocab)
    decoder.graph = NoReplay()
    decoder.signature = decoder._signature()


def host_parts(decoder, token: torch.Tensor, position: torch.Tensor, vocab: int, repeats: int, rounds: int) -> dict:
    """``{part: ms}`` and the op counts of one replayed step (see the module docstring)."""
    cache = decoder.cache
    replay_ready(decoder, token, vocab)
    ids = token.as_subclass(OnDevice)
    host = [(layer.num_slots, layer.seen) for layer in cache.layers]

    def restore():                                 # a no-op replay moved no device counter: undo the host ones
        for layer, (slots, seen) in zip(cache.layers, host):
            layer.num_slots, layer.seen = slots, seen
            layer._refresh_views()

    if not decoder._room():
        raise SystemExit(f"{type(cache).__name__}: no room for a replay ({cache.eager_step_reason()})")
    parts = {"room": decoder._room,
             "signature": lambda: decoder.signature != decoder._signature(),
             "copy inputs": lambda: (decoder.static_ids.copy_(token), decoder.static_pos.copy_(position)),
             "advance": lambda: cache.advance(1),
             "maintain": lambda: [cache.maintain_layer(i) for i in range(len(cache.layers))],
             "step": lambda: decoder.step(ids, position)}
    out = quiet_median_ms(parts, repeats, rounds, restore)
    captures = decoder.captures
    with OpCount() as count:
        decoder.step(ids, position)
    restore()
    if decoder.captures != captures or not isinstance(decoder.graph, NoReplay):
        raise SystemExit("the timed step did not replay")
    out["ops"], out["kernels"] = count.ops, count.kernels
    return out


@torch.inference_mode()
def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparse_hf.bench import _case_cache
    from sparse_hf.hf.cuda_graph import GraphDecoder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=300, help="calls a round, per part")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the quietest round's median is printed")
    args = p.parse_args()
    cfg = AutoConfig.for_model("qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=28,
                               num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                               max_position_embeddings=2 * args.length + 64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    L = args.length
    deltakv = (("deltakv", "kv_quant_bits", 4), ("deltakv", "full_attn_layers", [0, 3, 15, 21]))
    for method, overrides in [("snapkv", ()), ("deltakv", deltakv)]:
        cache, _ = _case_cache(model, method, 0.1, L, 64, overrides, True)
        out = model(input_ids=torch.randint(0, 1000, (1, L)), past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(3):   # a few eager decode steps: DeltaKV's state and scratch exist, as before a capture
            out = model(input_ids=token, position_ids=torch.tensor([[L + i]]), past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        parts = host_parts(GraphDecoder(model, cache), token, torch.tensor([[L + 3]]), cfg.vocab_size, args.repeats,
                           args.rounds)
        line = ", ".join(f"{name} {ms:.3f} ms" if isinstance(ms, float) else f"{name} {ms}"
                         for name, ms in parts.items())
        print(f"{method}: {line}", flush=True)


if __name__ == "__main__":
    main()
