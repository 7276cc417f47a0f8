"""Teacher-forced answer loss of eval prompts under several caches: where DeltaKV's accuracy goes (issue 12/14).

For each eval prompt (as ``sparse-hf eval`` builds it: chat template, answer prefix), the prompt is prefilled into a
cache and the gold answer (``" " + answers[0]``) is fed one decode step at a time; per cache it reports the answer's
mean negative log-likelihood per token and the share of prompts whose every answer token is the argmax (greedy
would write the answer). Decode steps are where sparse caches select and DeltaKV rebuilds, so at equal knobs:
``omnikv - full`` is the selection's loss, ``deltakv - omnikv`` the compression of the selected tokens and
``deltakv@1.0 - full`` (every compressed token rebuilt) the compression alone. A continuous, paired measure: few
prompts separate configurations that greedy accuracy on the same prompts cannot.

Each ``--config`` is ``NAME=METHOD@BUDGET`` or ``NAME=METHOD@BUDGET:{json knobs}`` (``full`` needs no budget); the
budget gives the eval's knobs (:func:`sparse_hf.eval.runner.budget_to_cache_config`: 4 sinks, a recent window, the
rest as top tokens) and the JSON is merged last, e.g. ``'all=deltakv@0.25:{"num_top_tokens": 1.0}'``.

Usage (2-core CPU, float32)::

    OMP_NUM_THREADS=1 python benchmarks/deltakv_answer_nll.py --tasks niah_single,niah_multikey,text_recall \
        --depths 0.1,0.5,0.9 --num-samples 1 --config full=full --config omni=omnikv@0.25 \
        --config delta=deltakv@0.25 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_config(text: str) -> tuple[str, str, float | None, dict]:
    name, _, spec = text.partition("=")
    spec, _, extra = spec.partition(":")
    method, _, budget = spec.partition("@")
    return name, method, float(budget) if budget else None, json.loads(extra) if extra else {}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="niah_single,niah_multikey,text_recall")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--first-sample", type=int, default=0, help="skip the first samples of each cell")
    p.add_argument("--model", default="demo", help="demo, qwen-coder or a local model path")
    p.add_argument("--deltakv-path", default="demo")
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--corpus-file", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import sparse_hf  # noqa: F401  (registers the caches)
    from transformers import DynamicCache

    from sparse_hf.eval.runner import budget_to_cache_config, encode_sample
    from sparse_hf.eval.tasks import build_samples
    from sparse_hf.eval.text_recall import load_paragraphs
    from sparse_hf.hf import build_cache, prepare_model
    from sparse_hf.models import load_model

    model, tok = load_model(args.model, dtype=torch.float32, device="cpu")
    model.eval()
    prepare_model(model)
    configs = [parse_config(c) for c in args.config]

    samples = []
    for task in args.tasks.split(","):
        paragraphs = load_paragraphs(args.corpus_file) if task == "text_recall" else None
        for depth in ([None] if task == "text_recall" else [float(d) for d in args.depths.split(",")]):
            kw = {"paragraphs": paragraphs} if paragraphs is not None else {"depth": depth}
            samples += build_samples(task, tok, args.length, args.first_sample + args.num_samples, 0,
                                     **kw)[args.first_sample:]

    rows = []
    t0 = time.time()
    for s in samples:
        ids = encode_sample(tok, s)
        answer = tok(" " + s["answers"][0].strip(), add_special_tokens=False, return_tensors="pt")["input_ids"]
        for name, method, budget, extra in configs:
            if method == "full":
                cache, knobs = DynamicCache(config=model.config), None
            else:
                if method == "deltakv":
                    extra = {"deltakv_path": args.deltakv_path, **extra}
                knobs = budget_to_cache_config(method, budget, ids.shape[1], extra)
                cache = build_cache(method, model.config, knobs)
            nll, hits = [], []
            with torch.no_grad():
                logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
                for t in range(answer.shape[1]):
                    logp = torch.log_softmax(logits.float(), -1)
                    nll.append(float(-logp[answer[0, t]]))
                    hits.append(int(logp.argmax()) == int(answer[0, t]))
                    if t + 1 < answer.shape[1]:
                        logits = model(answer[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            rows.append({"id": s["id"], "config": name, "method": method, "budget": budget,
                         "knobs": {k: v for k, v in (knobs or {}).items() if k != "deltakv_path"},
                         "answer_tokens": answer.shape[1], "nll": sum(nll) / len(nll), "all_argmax": all(hits),
                         "token_nll": nll})
            print(f"{time.time() - t0:6.0f} s {s['id']:28s} {name:12s} nll {rows[-1]['nll']:.3f} "
                  f"all_argmax {int(all(hits))}", flush=True)

    summary = {}
    for name, *_ in configs:
        mine = [r for r in rows if r["config"] == name]
        summary[name] = {"n": len(mine), "mean_nll": sum(r["nll"] for r in mine) / len(mine),
                         "all_argmax": sum(r["all_argmax"] for r in mine)}
        for task in args.tasks.split(","):
            t = [r for r in mine if r["id"].startswith(task)]
            summary[name][task] = {"mean_nll": round(sum(r["nll"] for r in t) / max(1, len(t)), 4),
                                   "all_argmax": sum(r["all_argmax"] for r in t), "n": len(t)}
    print(json.dumps(summary, indent=1))
    out = {"summary": summary, "rows": rows, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
