"""Issue 14's target measure on the Qwen2.5-Coder-0.5B grid (runs T, U, V and W, 2026-12-03), and the paired scope comparison.

"target": the mean, over the task x length cells the full cache passes (score >= 0.5; here all twelve), of a row's
score over the full cache's on the same prompts (issue 14: snapkv >= 0.90, omnikv and deltakv >= 0.95 at a 0.25
budget). Only rows with every cell present are given a target. "layer vs kv_head": snapkv and pyramidkv with
``selection_scope="layer"`` against ``"kv_head"`` on the prompts both finished (discordant pairs, exact McNemar p).
Usage: python3 target.py [folder]"""
import json
import os
import sys
from collections import defaultdict

from sparse_hf.eval.report import lane_label
from sparse_hf.eval.stats import mcnemar_exact

root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
rows = defaultdict(dict)
for lane in sorted(os.listdir(root)):       # every lane folder; lane_label keeps two lanes of one method apart
    path, suffix = os.path.join(root, lane, "predictions.jsonl"), f" ({lane_label(lane)})" if lane_label(lane) else ""
    if os.path.exists(path):
        for r in map(json.loads, open(path)):
            rows[(r["method"] + ("" if r["method"] == "full" else suffix), r["budget"])][r["id"]] = r
full = rows[("full", 1.0)]
cells = sorted({(r["task"], r["length"]) for r in full.values()})


def mean(recs, ids):
    return sum(recs[i]["score"] for i in ids) / len(ids)


passed = [c for c in cells if mean(full, [i for i, r in full.items() if (r["task"], r["length"]) == c]) >= 0.5]
print(f"cells the full cache passes: {len(passed)} of {len(cells)}")
print("| method | budget | prompts | target (vs full, same prompts) |")
print("|---|---|---|---|")
for (name, budget), recs in sorted(rows.items()):
    if name == "full":
        continue
    ratios = []
    for c in passed:
        ids = [i for i, r in recs.items() if (r["task"], r["length"]) == c and i in full]
        if ids and mean(full, ids) > 0:
            ratios.append(mean(recs, ids) / mean(full, ids))
    whole = len(ratios) == len(passed)
    print(f"| {name} | {budget:g} | {len(recs)} | {sum(ratios) / len(ratios):.2f}{'' if whole else ' (cells missing)'} |"
          if ratios else f"| {name} | {budget:g} | {len(recs)} | - |")
print("\n| method | budget | shared prompts | layer right, kv_head wrong | kv_head right, layer wrong | p |")
print("|---|---|---|---|---|---|")
for method in ("snapkv", "pyramidkv", "knorm"):
    for budget in (0.1, 0.25):
        a, b = rows.get((f"{method} (layer)", budget), {}), rows.get((f"{method} (kv_head)", budget), {})
        shared = set(a) & set(b)
        if shared:
            x = sum(a[i]["score"] > b[i]["score"] for i in shared)
            y = sum(a[i]["score"] < b[i]["score"] for i in shared)
            print(f"| {method} | {budget:g} | {len(shared)} | {x} | {y} | {mcnemar_exact(x, y):.2g} |")
