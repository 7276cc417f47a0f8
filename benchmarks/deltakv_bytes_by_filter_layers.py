"""DeltaKV's KV bytes against the number of filter (full-attention) layers, by the cache's own accounting (issue 12).

What: builds the bench's DeltaKV cache (``sparse_hf.bench._make_cache``: the budget rule, a random latent-256
compressor, ``kv_quant_bits``) for a model with Qwen2.5-7B's KV shape (28 layers, 4 KV heads of 128, bf16), plans the
generation as ``deltakv+graph`` does (``plan_generation``), prefills ``--lengths`` random tokens, decodes
``--steps`` tokens and prints ``kv_usage``'s ratio and the bytes by part. Why: the ratio depends on how many layers
are filter layers, not on which, nor on the model's other widths, so a narrow model (hidden 512, 4 query heads, MLP 64,
vocab 1024) gives the 7B's KV bytes on a CPU. The ratio is ``A + C / L`` in the length ``L`` (everything but the
sinks and the recent buffers grows with ``L``), so two lengths give ``A + C / 131072`` at 128K.

Run: ``OMP_NUM_THREADS=1 python benchmarks/deltakv_bytes_by_filter_layers.py --lengths 2048,4096``.
"""

from __future__ import annotations

import argparse
import json

import torch

from sparse_hf.bench import _make_cache
from sparse_hf.hf.deltakv_layer import DeltaKVLayer
from sparse_hf.usage import kv_usage

LAYER_SETS = {7: [0, 1, 2, 3, 8, 16, 22], 5: [0, 1, 2, 8, 16], 4: [0, 3, 8, 16], 3: [0, 8, 16]}


def narrow_qwen7b():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=512, intermediate_size=64, num_hidden_layers=28,
                                  num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, rope_theta=1e6,
                                  max_position_embeddings=1 << 19, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()


@torch.inference_mode()
def measure(model, length, layers, budget, bits, steps):
    """``(ratio, {part: bytes})`` of the cache after a ``length``-token prompt and ``steps`` decode steps."""
    overrides = [("deltakv", "kv_quant_bits", bits), ("deltakv", "full_attn_layers", layers)]
    cache, _ = _make_cache(model, "deltakv", budget, length, steps, overrides)
    cache.plan_generation(length, steps + 1)
    ids = torch.randint(10, model.config.vocab_size - 10, (1, length))
    token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
    for i in range(steps):
        pos = torch.full((1, 1), length + i)
        token = model(input_ids=token[:, None], past_key_values=cache, position_ids=pos,
                      use_cache=True).logits[:, -1].argmax(-1)
    parts = {}
    for layer in cache.layers:
        kind = "compressed" if isinstance(layer, DeltaKVLayer) else "filter"
        items = layer.bytes_by_part().items() if hasattr(layer, "bytes_by_part") else [("all", layer.allocated_bytes())]
        for name, n in items:
            parts[f"{kind}: {name}"] = parts.get(f"{kind}: {name}", 0) + n
    usage = kv_usage(cache)
    return usage.ratio, usage.full_bytes, parts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--filter-layers", default="7,4,3", help="counts, from " + str(sorted(LAYER_SETS)))
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--output", default=None, help="write the rows as JSON")
    args = p.parse_args()
    model = narrow_qwen7b()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for n in [int(x) for x in args.filter_layers.split(",")]:
        ratios = {}
        for length in lengths:
            ratio, full, parts = measure(model, length, LAYER_SETS[n], args.budget, args.bits, args.steps)
            ratios[length] = ratio
            rows.append(dict(filter_layers=n, layers=LAYER_SETS[n], length=length, steps=args.steps, ratio=ratio,
                             full_bytes=full, parts=parts))
            print(f"{n} filter layers, L={length}: ratio {ratio:.4f}", flush=True)
        if len(lengths) >= 2:   # ratio = A + C / L through the two longest lengths
            (l1, r1), (l2, r2) = sorted(ratios.items())[-2:]
            c = (r1 - r2) / (1 / l1 - 1 / l2)
            a = r2 - c / l2
            at = a + c / 131072
            rows.append(dict(filter_layers=n, length=131072, ratio=at, extrapolated_from=[l1, l2]))
            print(f"{n} filter layers: A + C/L through L={l1},{l2} -> {at:.4f} at 131072 (A = {a:.4f})", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
