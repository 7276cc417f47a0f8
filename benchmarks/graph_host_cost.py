"""Host time of :class:`GraphDecoder`'s per-step bookkeeping around a replay (the buffer signature, the room check,
the layers' maintenance) for snapkv and deltakv, on any device: a 28-layer Qwen2 model of tiny width (the Qwen2.5-7B
layer count; the host work grows with layers, not width), prefilled with ``--length`` random tokens.

    python benchmarks/graph_host_cost.py --length 2048

Prints one line per method with the median milliseconds of each part (what ``profile_hf_graph.py`` reports as
``host_ms`` on the GPU, without the replay and the sync).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparse_hf.bench import _case_cache
    from sparse_hf.hf.cuda_graph import GraphDecoder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=300)
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
        decoder = GraphDecoder(model, cache)
        first = decoder._signature()
        parts = {"signature (build + compare)": lambda: decoder._signature() == first,
                 "room check": decoder._room,
                 "maintain layers": lambda: [cache.maintain_layer(i) for i in range(len(cache.layers))]}
        line = ", ".join(f"{name} {median_ms(fn, args.repeats):.3f} ms" for name, fn in parts.items())
        print(f"{method}: {line}", flush=True)


if __name__ == "__main__":
    main()
