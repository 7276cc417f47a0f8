"""Measured quality of a trained DeltaKV compressor on the demo model (SmolLM2-135M-Instruct) or ``--model qwen-coder``.

What it measures, on text the compressor never saw (``prepare_corpus.py``'s held-out novel):

1. **Perplexity, decode path.** Each sample is a held-out chapter: its first ``--context`` tokens are prefilled
   through ``model(...)`` with the cache, then the next ``--score`` tokens are fed ``--chunk`` at a time
   (1 = real decode steps), so later tokens attend to compressed earlier ones. Caches: the full
   ``DynamicCache``; OmniKV with the same filter layers and budget (selection only, no compression: it
   separates the selection error from the compression error); DeltaKV rebuilding every compressed token
   (compression error only) and DeltaKV with the budget (what DeltaKV really runs).
2. **Training-style proxy.** ``DeltaKVTrainingModel.measure``: one teacher-forced pass in which every token after
   the 16 sinks is reconstructed (no raw recent buffer, no selection), for all layers and for the layers that
   inference compresses.
3. **Passkey retrieval** at ``--passkey-lengths`` (a 5-digit key at several depths, chat template, greedy) with
   ``model.generate(cache_implementation=...)``.
4. **KV memory** from ``sparse_hf.kv_usage(cache)`` after each run.

It prints a markdown report, writes it to ``--out`` and, with ``--save-card``, re-saves the compressor so that
its README.md model card carries the numbers. Example (docs/deltakv_quality.md's run B: 6 minutes on an H200,
about an hour on 2 CPU cores without ``--device cuda``)::

    python examples/prepare_corpus.py --data-dir ~/.cache/sparse_hf/data/austen
    python examples/deltakv_quality.py --compressor ~/.cache/sparse_hf/compressors/smollm2-deltakv-96 \\
        --device cuda --context 3584 --score 256 --budget 0.25,0.5 --full-attn-layers 0,1,2,8,16 \\
        --num-recent-tokens 64 --kv-quant-bits 8 --passkey-depths 0.1,0.3,0.5,0.7,0.9 --out report.md --save-card
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import shlex
import sys
import time

import torch

from sparse_hf.hf.compat import cache_argument

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


# -- data ---------------------------------------------------------------------------------------------------------
def heldout_samples(tok, path: str, length: int, count: int) -> list[tuple[str, torch.Tensor]]:
    """``count`` windows of ``length`` tokens (bos + chapter start), from chapters spread over the held-out file."""
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    usable = []
    for doc in docs:
        ids = bos + tok(doc["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            usable.append((f"{doc['book']} ch. {doc['chapter']}", torch.tensor([ids[:length]])))
    if len(usable) < count:
        raise SystemExit(f"only {len(usable)} held-out chapters have {length} tokens; "
                         "lower --context, --score or --samples")
    stride = len(usable) / count
    return [usable[int(i * stride)] for i in range(count)]


def passkey_prompt(tok, target_tokens: int, depth: float, rng: random.Random) -> tuple[torch.Tensor, str]:
    """A chat prompt of about ``target_tokens`` tokens hiding a 5-digit key at relative ``depth``."""
    key = str(rng.randint(10000, 99999))
    per = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    reps = max(1, (target_tokens - 60) // per)
    cut = int(reps * depth)
    body = FILLER * cut + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (reps - cut)
    msg = ("There is a pass key hidden in the following text. Find it and remember it.\n" + body
           + "\nWhat is the pass key? Answer with the number only.")
    text = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"], key


# -- measurements ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def decode_nll(model, ids: torch.Tensor, context: int, cache, chunk: int) -> tuple[float, int]:
    """Summed NLL of ``ids[:, context:]``: ``ids[:, :context]`` prefilled, the rest fed ``chunk`` tokens at a time."""
    out = model(input_ids=ids[:, :context], use_cache=True, logits_to_keep=1, **{cache_argument(model.forward): cache})
    logits = [out.logits[:, -1:]]
    pos = context
    while pos < ids.shape[1] - 1:
        end = min(pos + chunk, ids.shape[1] - 1)
        out = model(input_ids=ids[:, pos:end], use_cache=True, **{cache_argument(model.forward): cache})
        logits.append(out.logits)
        pos = end
    logits = torch.cat(logits, 1).float()
    target = ids[:, context:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), target.numel()


def make_cache(model, name: str, knobs: dict | None):
    import sparse_hf
    from transformers import DynamicCache

    if name == "full":
        return DynamicCache(config=model.config)
    return sparse_hf.build_cache(name, model.config, knobs)


def usage_row(cache) -> dict:
    import sparse_hf

    u = sparse_hf.kv_usage(cache)
    return {"ratio": u.ratio, "bytes": u.bytes, "full_bytes": u.full_bytes, "tokens": u.logical_tokens}


def training_proxy(model, comp, blocks: torch.Tensor, layers: list[int] | None) -> dict:
    """``DeltaKVTrainingModel.measure`` with ``comp`` restricted to ``layers`` (None = all its layers)."""
    from sparse_hf.trainer import DeltaKVTrainingModel

    if layers is not None:   # the same weights, for ``layers`` only
        comp = copy.deepcopy(comp)
        comp.config.compressed_layers = sorted(layers)
        for key in [k for k in comp.layers if int(k) not in set(layers)]:
            del comp.layers[key]
    grads = {p: p.requires_grad for p in comp.parameters()}
    wrapper = DeltaKVTrainingModel(model, comp)
    try:
        return wrapper.measure(blocks)
    finally:
        wrapper.release()
        for p, flag in grads.items():
            p.requires_grad_(flag)


# -- report ----------------------------------------------------------------------------------------------------------
def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo (SmolLM2-135M-Instruct) or qwen-coder (Qwen2.5-Coder-0.5B)")
    p.add_argument("--compressor", required=True, help="directory written by `sparse-hf train-compressor`")
    p.add_argument("--data-dir", default=os.path.expanduser("~/.cache/sparse_hf/data/austen"),
                   help="output of examples/prepare_corpus.py (heldout.jsonl, manifest.json)")
    p.add_argument("--context", type=int, default=1536, help="prefilled tokens per perplexity sample")
    p.add_argument("--score", type=int, default=256, help="scored tokens after the prefill")
    p.add_argument("--chunk", type=int, default=1, help="tokens per forward while scoring (1 = decode steps)")
    p.add_argument("--samples", type=int, default=4, help="held-out chapters used for perplexity")
    p.add_argument("--budget", default="0.25",
                   help="num_top_tokens of OmniKV/DeltaKV, a fraction of the current length; a comma list runs "
                        "several (passkey uses the first)")
    p.add_argument("--full-attn-layers", default="0,1,2")
    p.add_argument("--num-sink-tokens", type=int, default=8)
    p.add_argument("--num-recent-tokens", type=int, default=128)
    p.add_argument("--cluster-ratio", type=float, default=0.1)
    p.add_argument("--neighbors", type=int, default=4, help="deltakv_neighbor_count")
    p.add_argument("--kv-quant-bits", type=int, default=0, help="DeltaKV latent quantisation: 0 or 8 (int8)")
    p.add_argument("--proxy-blocks", type=int, default=4, help="held-out blocks for the training-style proxy")
    p.add_argument("--passkey-lengths", default="2048,4096")
    p.add_argument("--passkey-depths", default="0.2,0.5,0.8")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    p.add_argument("--save-card", action="store_true", help="re-save the compressor with the measured quality")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-perplexity", action="store_true", help="passkeys (and the proxy) only")
    p.add_argument("--device", default="cpu", help="cpu | cuda (model, caches and compressor)")
    p.add_argument("--dtype", default="float32", help="model and KV dtype: float32 | bfloat16 | float16")
    p.add_argument("--notes", default=None, help="a markdown file appended to the report (training details ...)")
    p.add_argument("--from-json", default=None,
                   help="skip measuring: render the report (and --save-card) from a --json file of an earlier run")
    args = p.parse_args(argv)
    args.budgets = [float(b) for b in str(args.budget).split(",") if b.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    from sparse_hf.deltakv import DeltaKVCompressor

    comp = DeltaKVCompressor.from_pretrained(os.path.expanduser(args.compressor)).eval()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            results = json.load(f)
        results.setdefault("meta", {"seconds": None, "argv": None,
                                    "date": datetime.datetime.fromtimestamp(os.path.getmtime(args.from_json),
                                                                            datetime.timezone.utc).isoformat()})
    else:
        results = measure(args, comp)
        results["meta"] = {"seconds": results.pop("seconds"), "argv": list(sys.argv[1:] if argv is None else argv),
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           "machine": machine_line(args)}
    if args.json and not args.from_json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    if not results["ppl"]:   # --skip-perplexity: the printed lines and the JSON are the output
        return 0
    report = render(args, comp, results)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)
    if args.save_card:
        save_card(args, comp, results)
    return 0


def measure(args, comp) -> dict:
    """Run every measurement; returns the results dict that :func:`render` reads."""

    import sparse_hf
    from sparse_hf.models import load_model
    from sparse_hf.trainer import build_train_dataset

    t_start = time.time()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    comp.to(args.device)
    heldout = os.path.join(os.path.expanduser(args.data_dir), "heldout.jsonl")
    length = args.context + args.score
    results: dict = {"ppl": {}, "memory": {}, "passkey": {}, "proxy": {}}

    # 2. training-style proxy (before prepare_model: it runs the plain attention with patched K/V)
    blocks = build_train_dataset(heldout, tok, length, max_blocks=args.proxy_blocks)
    blocks = torch.tensor(blocks["input_ids"], dtype=torch.long)
    full_layers = [int(i) for i in args.full_attn_layers.split(",") if i.strip()]
    inference_layers = [i for i in comp.config.layer_indices if i not in full_layers]
    results["proxy"]["all"] = training_proxy(model, comp, blocks, None)
    results["proxy"]["inference"] = training_proxy(model, comp, blocks, inference_layers)
    print("proxy:", json.dumps(results["proxy"]), flush=True)

    # 1. perplexity on the decode path
    sparse_hf.prepare_model(model)
    base = dict(full_attn_layers=args.full_attn_layers, num_sink_tokens=args.num_sink_tokens,
                num_recent_tokens=args.num_recent_tokens)
    dkv = dict(base, compressor=comp, cluster_ratio=args.cluster_ratio, deltakv_neighbor_count=args.neighbors,
               kv_quant_bits=args.kv_quant_bits)
    configs = {"full": ("full", None)}
    configs.update({f"omnikv (top {b:g})": ("omnikv", dict(base, num_top_tokens=b)) for b in args.budgets})
    configs["deltakv (rebuild all)"] = ("deltakv", dict(dkv, num_top_tokens=1.0))
    configs.update({f"deltakv (top {b:g})": ("deltakv", dict(dkv, num_top_tokens=b)) for b in args.budgets})
    samples = heldout_samples(tok, heldout, length, args.samples)
    for label, (name, knobs) in (configs.items() if not args.skip_perplexity else ()):
        nll = count = 0.0
        t0 = time.time()
        per_sample = []
        for doc, ids in samples:
            cache = make_cache(model, name, knobs)
            s, n = decode_nll(model, ids.to(args.device), args.context, cache, args.chunk)
            nll += s
            count += n
            per_sample.append(math.exp(s / n))
        results["ppl"][label] = {"ppl": math.exp(nll / count), "per_sample": per_sample,
                                 "seconds": time.time() - t0}
        results["memory"][f"{label} @ {length}"] = usage_row(cache)
        print(f"ppl {label}: {results['ppl'][label]['ppl']:.3f} ({[round(x, 2) for x in per_sample]}) "
              f"mem {results['memory'][f'{label} @ {length}']['ratio']:.3f} in {time.time() - t0:.0f}s", flush=True)

    # 3. passkey retrieval
    lengths = [int(x) for x in args.passkey_lengths.split(",") if x.strip()]
    depths = [float(x) for x in args.passkey_depths.split(",") if x.strip()]
    pk_configs = {"full": (None, None)}
    pk_configs.update({f"omnikv (top {b:g})": ("omnikv", dict(base, num_top_tokens=b)) for b in args.budgets})
    pk_configs.update({f"deltakv (top {b:g})": ("deltakv", dict(dkv, num_top_tokens=b)) for b in args.budgets})
    pk_configs["deltakv (rebuild all)"] = ("deltakv", dict(dkv, num_top_tokens=1.0))
    for n_tokens in lengths:
        rng = random.Random(n_tokens)
        prompts = [passkey_prompt(tok, n_tokens, d, rng) for d in depths]
        for label, (name, knobs) in pk_configs.items():
            hits, answers = 0, []
            t0 = time.time()
            for ids, key in prompts:
                ids = ids.to(args.device)
                kw = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
                if knobs is not None:
                    kw.update(cache_implementation=name, cache_config=knobs)
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
                answer = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
                hits += key in answer
                answers.append(f"{key}->{answer!r}")
            results["passkey"][f"{label} @ {n_tokens}"] = {"correct": hits, "total": len(prompts),
                                                           "prompt_tokens": int(ids.shape[1]),
                                                           "answers": answers, "seconds": time.time() - t0}
            results["memory"][f"{label} passkey @ {int(ids.shape[1])}"] = usage_row(getattr(out, "cache", None) or out.past_key_values)
            print(f"passkey {label} @ {n_tokens}: {hits}/{len(prompts)} {answers} "
                  f"mem {results['memory'][f'{label} passkey @ {int(ids.shape[1])}']['ratio']:.3f}", flush=True)

    results["seconds"] = time.time() - t_start
    return results


def deltakv_rows(results) -> dict[str, dict]:
    """The DeltaKV perplexity rows: label -> {"ppl", "gap" (relative to full)}."""
    full = results["ppl"]["full"]["ppl"]
    return {label: {"ppl": r["ppl"], "gap": r["ppl"] / full - 1.0}
            for label, r in results["ppl"].items() if label.startswith("deltakv")}


def deltakv_memory(results) -> dict[int, float]:
    """DeltaKV's KV memory ratio by sequence length (the perplexity runs and the passkey prompts)."""
    mem = {}
    for label, m in results["memory"].items():
        if label.startswith("deltakv"):
            n = int(label.rsplit("@", 1)[1])   # the perplexity sample length or the passkey prompt length
            mem[n] = max(mem.get(n, 0.0), m["ratio"])
    return dict(sorted(mem.items()))


def save_card(args, comp, results) -> None:
    """Re-save the compressor so that its README.md model card carries the measured numbers."""
    length = args.context + args.score
    full = results["ppl"]["full"]["ppl"]
    rows = deltakv_rows(results)
    proxy = results["proxy"]["inference"]
    pk = {k: v for k, v in results["passkey"].items() if k.startswith("deltakv")}
    best = rows.get(f"deltakv (top {args.budgets[0]:g})", next(iter(rows.values())))
    quality = {
        "reconstruction MSE (held-out)": round(proxy["reconstruction MSE (held-out)"], 5),
        "perplexity (full KV)": round(full, 4),
        "perplexity (DeltaKV)": round(best["ppl"], 4),
        "needle-in-a-haystack accuracy": "; ".join(f"{k}: {v['correct']}/{v['total']}" for k, v in pk.items())
                                         + " (5-digit passkey, greedy, depths " + args.passkey_depths + ")",
    }
    for label, r in rows.items():
        quality[f"perplexity, {label}"] = f"{r['ppl']:.3f} ({100 * r['gap']:+.2f}% vs full {full:.3f})"
    quality["KV memory vs full cache"] = ", ".join(f"{100 * v:.1f}% at {n} tokens"
                                                   for n, v in deltakv_memory(results).items())
    quality["training-style proxy (every token reconstructed)"] = (
        f"perplexity {proxy['perplexity (DeltaKV)']:.3f} vs {proxy['perplexity (full KV)']:.3f} on "
        f"{args.proxy_blocks} held-out blocks of {length} tokens")
    quality["measured on"] = (
        f"held-out novel (Persuasion, never trained on): {args.samples} chapters, {args.context}-token prefill "
        f"then {args.score} tokens decoded one at a time; full_attn_layers={args.full_attn_layers}, sinks "
        f"{args.num_sink_tokens}, recent {args.num_recent_tokens}, cluster_ratio {args.cluster_ratio}, "
        f"neighbors {args.neighbors}, kv_quant_bits {args.kv_quant_bits}; SmolLM2-135M-Instruct on "
        f"{results.get('meta', {}).get('machine') or machine_line(args)}; examples/deltakv_quality.py")
    training_data = None
    manifest_path = os.path.join(os.path.expanduser(args.data_dir), "manifest.json")
    if os.path.exists(manifest_path) and (comp.config.training_data or "").endswith("train.jsonl"):
        with open(manifest_path, encoding="utf-8") as f:
            m = json.load(f)
        training_data = (f"{m['source']}: {', '.join(m['splits']['train']['books'])} "
                         f"({m['splits']['train']['words']:,} words; {m['heldout']} held out), "
                         "via examples/prepare_corpus.py")
    comp.save_pretrained(os.path.expanduser(args.compressor), quality=quality, training_data=training_data)
    print(f"model card updated: {os.path.join(os.path.expanduser(args.compressor), 'README.md')}")


def machine_line(args) -> str:
    """Where the numbers come from: the processor or GPU, the library versions and the dtype."""
    import transformers

    where = (f"{torch.cuda.get_device_name()} GPU" if str(args.device).startswith("cuda")
             else f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU")
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"model and caches in {getattr(args, 'dtype', 'float32')}")


def _command(results) -> str:
    argv = results.get("meta", {}).get("argv")
    if argv is None:
        return "(not recorded)"
    return "python examples/deltakv_quality.py " + " ".join(
        a if a.startswith("~/") and shlex.quote(a[1:]) == a[1:] else shlex.quote(a) for a in argv)


def render(args, comp, results) -> str:
    length = args.context + args.score
    full = results["ppl"]["full"]["ppl"]
    meta = results.get("meta", {})
    c = comp.config
    manifest_path = os.path.join(os.path.expanduser(args.data_dir), "manifest.json")
    corpus = "unknown"
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            m = json.load(f)
        corpus = (f"{m['source']}; train: {m['splits']['train']['chapters']} chapters of "
                  f"{', '.join(m['splits']['train']['books'])} ({m['splits']['train']['words']:,} words); "
                  f"held out: {m['heldout']} ({m['splits']['heldout']['chapters']} chapters, "
                  f"{m['splits']['heldout']['words']:,} words)")
    seconds = meta.get("seconds")
    lines = [
        "# DeltaKV quality on " + {"demo": "the demo model (SmolLM2-135M-Instruct)",
                                   "qwen-coder": "Qwen2.5-Coder-0.5B-Instruct"}.get(getattr(args, "model", "demo"), args.model),
        "",
        f"- **Date:** {str(meta.get('date', '?'))[:16].replace('T', ' ')} UTC"
        + (f"; measuring took {seconds / 60:.0f} min" if seconds else ""),
        f"- **Machine:** {meta.get('machine') or machine_line(args)}",
        f"- **Command:** `{_command(results)}`",
        f"- **Corpus:** {corpus} (made by `examples/prepare_corpus.py`)",
        f"- **Compressor:** latent {c.kv_compressed_size} of D = {c.kv_dim}, down {c.down_type}, up {c.up_type}, "
        f"bias {c.bias}, {len(c.layer_indices)} layers; training record: "
        + ", ".join(f"{k}={v}" for k, v in (c.training or {}).items()),
        f"- **Cache knobs:** full_attn_layers={args.full_attn_layers}, num_sink_tokens={args.num_sink_tokens}, "
        f"num_recent_tokens={args.num_recent_tokens}, cluster_ratio={args.cluster_ratio}, "
        f"deltakv_neighbor_count={args.neighbors}; 'top b' is num_top_tokens=b (a fraction of the current "
        "length), 'rebuild all' is num_top_tokens=1.0 (every compressed token rebuilt at every step)",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for n, ratio in deltakv_memory(results).items():
        lines.append(f"| KV memory <= 35% of the full cache | {100 * ratio:.1f}% at {n} tokens | "
                     f"{'yes' if ratio <= 0.35 else 'no'} |")
    for label, r in deltakv_rows(results).items():
        lines.append(f"| perplexity within 5% of the full cache, {label} | {r['ppl']:.3f} vs {full:.3f} "
                     f"({100 * r['gap']:+.2f}%) | {'yes' if r['gap'] <= 0.05 else 'no'} |")
    lines += [
        "",
        f"## Perplexity: {args.samples} held-out chapters, {args.context}-token prefill, next {args.score} tokens "
        f"fed {args.chunk} at a time",
        "",
        "| cache | perplexity | vs full | per sample | KV memory at end | time |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results["ppl"].items():
        mem = results["memory"][f"{label} @ {length}"]
        lines.append(f"| {label} | {r['ppl']:.3f} | {100 * (r['ppl'] / full - 1):+.2f}% | "
                     f"{', '.join(f'{x:.2f}' for x in r['per_sample'])} | {100 * mem['ratio']:.1f}% "
                     f"({fmt_bytes(mem['bytes'])} / {fmt_bytes(mem['full_bytes'])}) | {r['seconds']:.0f} s |")
    lines += ["", f"## Training-style proxy ({args.proxy_blocks} held-out blocks of {length} tokens, every token "
                  "after 16 sinks reconstructed, no raw recent buffer, no selection)", "",
              "| layers compressed | perplexity full | perplexity reconstructed | vs full | reconstruction MSE |",
              "|---|---|---|---|---|"]
    for label, key in (("all layers (as in training)", "all"),
                       (f"all but {args.full_attn_layers} (as at inference)", "inference")):
        r = results["proxy"][key]
        lines.append(f"| {label} | {r['perplexity (full KV)']:.3f} | {r['perplexity (DeltaKV)']:.3f} | "
                     f"{100 * (r['perplexity (DeltaKV)'] / r['perplexity (full KV)'] - 1):+.2f}% | "
                     f"{r['reconstruction MSE (held-out)']:.4f} |")
    lines += ["", "## Passkey retrieval (5-digit key, chat template, greedy, depths "
                  f"{args.passkey_depths})", "",
              "| cache | prompt tokens | correct | KV memory | answers |", "|---|---|---|---|---|"]
    for label, r in results["passkey"].items():
        name = label.split(" @ ")[0]
        mem = results["memory"][f"{name} passkey @ {r['prompt_tokens']}"]
        lines.append(f"| {name} | {r['prompt_tokens']} | {r['correct']}/{r['total']} | {100 * mem['ratio']:.1f}% | "
                     f"{'; '.join(a.replace('|', '/') for a in r['answers'])} |")
    lines += ["", "KV memory is `sparse_hf.kv_usage(cache).ratio`: bytes the cache holds (raw K/V and their slot "
                  "position tables, pre-norm keys of raw tokens for Qwen3, latents, father ids, positions, centers) "
                  "over the bytes of a full `DynamicCache` of the same length (since 2026-11-29 01:30 UTC: earlier "
                  "runs left the slot position tables out, and stored pre-RoPE keys for every architecture).", ""]
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            lines += [f.read().rstrip(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
