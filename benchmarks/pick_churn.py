"""How many of a filter layer's picks are new at each decode step, on a real model (issue 12's design question).

DeltaKV rebuilds every picked compressed token at every decode step (gather, ``up``, writeback: ~1.1 ms of the 128K
step, at the kernels' byte floors). Scratch slots that persist between steps would only need the picks that were not
picked at the previous step; whether that pays depends on how many of a step's picks are new. DeltaKV picks with
OmniKV's rule (a filter layer's scores, top-k over the tokens that are neither sinks nor recent), so this measures
OmniKV's decode selections through ``generate`` (HF path, ``cache_implementation="omnikv"``, one prompt at a time):

    python benchmarks/pick_churn.py --model demo --tasks niah_single,text_recall --lengths 2048,8192 \\
        --budgets 0.1,0.25 --num-samples 2 --new-tokens 16 [--random-weights]

For each decode step after the first and each filter layer: ``new`` = picks (top-k part only: sinks and the recent
window are raw slots, never rebuilt) not in the previous step's picks of that layer, over the picks. Prints one JSON
line per (task, length, budget) with the mean, median and 90th percentile of ``new`` over steps and layers. A token
that has just left the recent window is a candidate and counts as new when picked. ``--random-weights``: the
model's config with seeded random weights (what ``sparse-hf bench`` times) instead of the trained model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def churn_for_prompt(model, tok, prompt: str, budget: float, new_tokens: int) -> list[float]:
    import sparse_hf  # noqa: F401  (registers the cache implementations)
    from sparse_hf.methods.omnikv import OmniKV

    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    n = ids["input_ids"].shape[1]
    knobs = OmniKV.knobs_for_budget(budget, n)
    sink, recent = knobs["num_sink_tokens"], knobs["num_recent_tokens"]
    picks: list[tuple[int, set[int]]] = []      # (observer layers per step, top-k positions) per observer call
    original = OmniKV.select_decode

    def recording(self, logits, valid, lengths, *args, **kwargs):
        out = original(self, logits, valid, lengths, *args, **kwargs)
        if out is not None and valid.shape[0] == 1:
            idx, ok = out
            L = int(valid[0].sum())
            top = {int(i) for i, o in zip(idx[0].tolist(), ok[0].tolist()) if o and sink <= i < L - recent}
            picks.append((len(self.obs_layers), top))
        return out

    OmniKV.select_decode = recording
    try:
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, cache_implementation="omnikv",
                           cache_config=knobs, pad_token_id=tok.pad_token_id)
    finally:
        OmniKV.select_decode = original
    obs = picks[0][0] if picks else 1           # calls come in layer order, one per observer layer and step
    fractions = []
    for i in range(obs, len(picks)):
        prev, cur = picks[i - obs][1], picks[i][1]
        if cur:
            fractions.append(len(cur - prev) / len(cur))
    return fractions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--tasks", default="niah_single,text_recall")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--budgets", default="0.1,0.25")
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-weights", action="store_true",
                   help="the model's config with random weights (seeded), as `sparse-hf bench` measures speed on")
    args = p.parse_args(argv)
    from sparse_hf.eval.tasks import build_samples
    from sparse_hf.models import load_model

    model, tok = load_model(args.model)
    if args.random_weights:
        from transformers import AutoModelForCausalLM
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    for task in args.tasks.split(","):
        for length in map(int, args.lengths.split(",")):
            samples = build_samples(task, tok, length, args.num_samples, args.seed,
                                    depth=0.5 if task.startswith("niah") else None)
            for budget in map(float, args.budgets.split(",")):
                fr = []
                for s in samples:
                    fr += churn_for_prompt(model, tok, s["prompt"], budget, args.new_tokens)
                if not fr:
                    print(json.dumps(dict(task=task, length=length, budget=budget, error="no decode selections")))
                    continue
                q = statistics.quantiles(fr, n=10)
                print(json.dumps(dict(model=args.model + (" (random weights)" if args.random_weights else ""),
                                      task=task, length=length, budget=budget, prompts=len(samples),
                                      transitions=len(fr), new_mean=round(statistics.mean(fr), 4),
                                      new_median=round(statistics.median(fr), 4), new_p90=round(q[-1], 4))),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
