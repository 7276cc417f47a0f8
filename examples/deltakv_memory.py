"""DeltaKV's KV memory against a full cache, by dtype, latent quantization and cache knobs (no quality).

For each setting it prefills one passkey-style prompt of each length on the demo model (SmolLM2-135M-Instruct),
decodes a few tokens with ``model.generate(cache_implementation="deltakv")`` and prints
``sparse_hf.kv_usage(cache).ratio`` with a per-part breakdown of one compressed layer as a markdown table.
``--plot`` draws that breakdown as stacked bars (also from the table of an earlier run, ``--from-table``). Example::

    python examples/deltakv_memory.py --compressor ~/.cache/sparse_hf/compressors/smollm2-deltakv-96 \\
        --lengths 2048,4096,8192 --dtypes float32,bfloat16 --bits 8,4 | tee memory.md
    python examples/deltakv_memory.py --from-table memory.md --plot memory.png
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deltakv_quality import passkey_prompt  # noqa: E402  (the same prompts as the quality report)


def read_table(path: str) -> list[dict]:
    """Rows of a table this script printed: dtype, bits, layers, recent, tokens, ratio and parts (bytes/token)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 7 or not cells[4].isdigit():
                continue
            parts = {}
            for item in cells[6].split(", "):
                name, value = item.rsplit(" ", 1)
                parts[name] = float(value)
            rows.append({"dtype": cells[0], "bits": int(cells[1]), "layers": cells[2], "recent": int(cells[3]),
                         "tokens": int(cells[4]), "ratio": float(cells[5].rstrip("%")) / 100, "parts": parts})
    return rows


def plot(rows: list[dict], path: str) -> None:
    """One panel per dtype: stacked bytes per token of one compressed layer, with the full cache's bytes as a
    line and each setting's whole-cache ratio on top of its bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    width = max(6.0, 0.42 * max(sum(r["dtype"] == d for r in rows) for d in dtypes) + 2)
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(width, 6 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        sel = [r for r in rows if r["dtype"] == dtype]
        names = list(sel[0]["parts"])
        bottom = [0.0] * len(sel)
        for name in names:
            vals = [r["parts"][name] for r in sel]
            ax.bar(range(len(sel)), vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, r in enumerate(sel):
            ax.text(i, bottom[i], f"{r['ratio']:.0%}", ha="center", va="bottom", fontsize=7)
        full = 384 * (4 if dtype == "float32" else 2)   # SmolLM2: K+V of 3 heads x 64 per layer and token
        ax.axhline(full, color="k", lw=0.8, ls="--")
        ax.text(len(sel) - 0.5, full, "full cache", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([f"{r['tokens'] / 1000:.1f}K int{r['bits']} filter {r['layers']} recent {r['recent']}"
                            for r in sel], fontsize=7, rotation=90)
        ax.set_ylabel("bytes per token, one compressed layer")
        ax.set_title(f"DeltaKV on SmolLM2-135M, {dtype} KV (label: whole-cache ratio)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    import random

    import sparse_hf
    from sparse_hf.deltakv import DeltaKVCompressor
    from sparse_hf.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", help="compressor directory (required unless --from-table)")
    p.add_argument("--from-table", help="skip measuring: read the table an earlier run printed")
    p.add_argument("--plot", help="write a stacked-bar PNG of the per-part bytes here")
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--bits", default="8,4", help="kv_quant_bits values")
    p.add_argument("--full-attn-layers", default="0,1,2;0,1,2,8,16", help="';'-separated filter-layer sets")
    p.add_argument("--num-recent-tokens", default="128,64")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.from_table:
        if args.plot:
            plot(read_table(args.from_table), args.plot)
        return 0
    if not args.compressor:
        p.error("--compressor is required unless --from-table is given")
    comp = DeltaKVCompressor.from_pretrained(os.path.expanduser(args.compressor)).eval().to(args.device)
    print("| dtype | kv_quant_bits | full_attn_layers | num_recent_tokens | tokens | KV memory | one compressed layer: "
          "bytes per token by part |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        model, tok = load_model("demo", dtype=getattr(torch, dtype), device=args.device)
        sparse_hf.prepare_model(model)
        for length in [int(x) for x in args.lengths.split(",")]:
            ids, _ = passkey_prompt(tok, length, 0.5, random.Random(length))
            ids = ids.to(args.device)
            for bits in [int(b) for b in args.bits.split(",")]:
                for layers in args.full_attn_layers.split(";"):
                    for recent in [int(r) for r in args.num_recent_tokens.split(",")]:
                        knobs = dict(compressor=comp, num_top_tokens=0.25, full_attn_layers=layers,
                                     num_sink_tokens=8, num_recent_tokens=recent, kv_quant_bits=bits)
                        with torch.inference_mode():
                            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                                 do_sample=False, cache_implementation="deltakv", cache_config=knobs,
                                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
                        cache = out.past_key_values
                        usage = sparse_hf.kv_usage(cache)
                        layer = next(l for l in cache.layers if hasattr(l, "state"))
                        n = usage.logical_tokens
                        parts = ", ".join(f"{k} {v / n:.0f}" for k, v in layer.bytes_by_part().items())
                        print(f"| {dtype} | {bits} | {layers} | {recent} | {n} | {usage.ratio:.1%} | {parts} |",
                              flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
