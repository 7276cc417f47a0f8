"""Tables of the CPU engine lane of 2026-12-02 evening (pyramidkv and knorm at layer scope, omnikv; 2,048 tokens,
three tasks x 3 depths, 10 samples a cell), beside the H200 grid's full cache and snapkv (layer scope) on the same
prompts (run N, ``../smollm2_h200_engine_2026-12-02``). One row per method x budget: per task the samples and the
score; over all, the score with Wilson's 95% interval; paired on the same prompts, how many of the full cache's
correct answers the row also gets, and an exact sign test (McNemar) against snapkv's row at the same budget.
Usage: python3 table.py [folder]"""
import json
import math
import os
import sys
from collections import defaultdict

from sparse_hf.eval.stats import mcnemar_exact, wilson_interval

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
gpu = os.path.join(os.path.dirname(here), "smollm2_h200_engine_2026-12-02")
SOURCES = [(os.path.join(gpu, "base"), ""), (os.path.join(gpu, "scope_layer"), " (layer)"),
           (os.path.join(here, "scope_layer"), " (layer)"), (os.path.join(here, "omnikv"), "")]
TASKS, LENGTH = ["niah_single", "niah_multikey", "text_recall"], 2048

rows = defaultdict(dict)
for folder, suffix in SOURCES:
    path = os.path.join(folder, "predictions.jsonl")
    if not os.path.exists(path):
        continue
    for r in map(json.loads, open(path)):
        if r["length"] == LENGTH and r["method"] != "streamingllm":
            rows[(r["method"] + ("" if r["method"] == "full" else suffix), r["budget"])][r["id"]] = r
full = rows[("full", 1.0)]


def sign_test(a: dict, b: dict) -> str:
    """Two-sided exact sign test on the prompts both rows answered: (a right, b wrong) vs (a wrong, b right)."""
    shared = set(a) & set(b)
    x = sum(1 for i in shared if a[i]["score"] > b[i]["score"])
    y = sum(1 for i in shared if a[i]["score"] < b[i]["score"])
    p = mcnemar_exact(x, y)
    return f"{x} vs {y}, p={p:.2g}"


print(f"| method | budget | " + " | ".join(TASKS) + " | all: n, score, 95% CI | full's correct kept | vs snapkv (layer) "
      "| kept/layer | read/layer |")
print("|---" * (len(TASKS) + 7) + "|")
for (name, budget), recs in sorted(rows.items(), key=lambda kv: (kv[0][0] != "full", kv[0][1], kv[0][0])):
    cells = []
    for t in TASKS:
        rs = [r for r in recs.values() if r["task"] == t]
        cells.append(f"{sum(r['score'] for r in rs) / len(rs) * 100:.0f} ({len(rs)})" if rs else "-")
    k, n = sum(r["score"] for r in recs.values()), len(recs)
    lo, hi = wilson_interval(k, n)
    both = [i for i, r in full.items() if r["score"] == 1 and i in recs]
    kept = int(sum(recs[i]["score"] for i in both))
    snap = rows.get(("snapkv (layer)", budget))
    versus = sign_test(recs, snap) if snap and name != "snapkv (layer)" and name != "full" else ""

    def mean(field):
        values = [r[field] for r in recs.values() if r.get(field) is not None]
        return f"{sum(values) / len(values):.0f}" if values else "-"
    print(f"| {name} | {budget:g} | " + " | ".join(cells) + f" | {n}, {100 * k / n:.1f}, {100 * lo:.0f}–{100 * hi:.0f} "
          f"| {kept}/{len(both)} | {versus} | {mean('kept_tokens')} | {mean('read_tokens')} |")
