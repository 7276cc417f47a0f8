"""Issue 14, OmniKV/DeltaKV at 2,048 tokens: the default filter layers [0,1,2,3,8,16,22] against the calibrated ones
[0,3,14,17,21,27,28] (``../smollm2_h200_engine_2026-12-02/calibration.json``) and the default with 17 for 16, engine predictions on the grid's prompts.
Rows from other runs on the same prompts: full, snapkv (layer) and deltakv (default layers) from the H200 grid of
2026-12-02, omnikv (default layers) from the CPU lane of 2026-12-02 evening. Per task the score (samples); over all,
Wilson's 95% interval; "target": the mean over the cells the full cache passes (niah_single, text_recall) of the row's
score over full's on the same prompts (issue 14); paired sign test against the same method with the default layers.
Usage: python3 table.py"""
import json
import math
import os
from collections import defaultdict

from sparse_hf.eval.stats import mcnemar_exact, wilson_interval

here = os.path.dirname(os.path.abspath(__file__))
acc = os.path.dirname(here)
gpu, cpu = os.path.join(acc, "smollm2_h200_engine_2026-12-02"), os.path.join(acc, "smollm2_cpu_engine_2k_2026-12-02")
SOURCES = [(os.path.join(gpu, "base"), ""), (os.path.join(gpu, "scope_layer"), " (layer)"),
           (os.path.join(gpu, "deltakv"), ""), (os.path.join(cpu, "omnikv"), ""),
           (os.path.join(here, "omnikv_calib"), " (calibrated)"), (os.path.join(here, "deltakv_calib"), " (calibrated)"),
           (os.path.join(here, "deltakv_text"), ""), (os.path.join(here, "omnikv_l17"), " (17 for 16)"),
           (os.path.join(here, "omnikv_l17_01"), " (17 for 16)")]
TASKS, PASSED, LENGTH = ["niah_single", "niah_multikey", "text_recall"], ["niah_single", "text_recall"], 2048

rows = defaultdict(dict)
for folder, suffix in SOURCES:
    path = os.path.join(folder, "predictions.jsonl")
    if os.path.exists(path):
        for r in map(json.loads, open(path)):
            if r["length"] == LENGTH and r["method"] in ("full", "snapkv", "omnikv", "deltakv"):
                rows[(r["method"] + ("" if r["method"] == "full" else suffix), r["budget"])][r["id"]] = r
full = rows[("full", 1.0)]


def sign_test(a: dict, b: dict) -> str:
    shared = set(a) & set(b)
    x = sum(1 for i in shared if a[i]["score"] > b[i]["score"])
    y = sum(1 for i in shared if a[i]["score"] < b[i]["score"])
    p = mcnemar_exact(x, y)
    return f"{x} vs {y}, p={p:.2g}"


def cell(recs, task):
    rs = [r for r in recs.values() if r["task"] == task]
    return sum(r["score"] for r in rs) / len(rs) if rs else None


print("| method | budget | " + " | ".join(TASKS) + " | all: n, score, 95% CI | target (vs full) | vs default layers |")
print("|---" * (len(TASKS) + 5) + "|")
for (name, budget), recs in sorted(rows.items(), key=lambda kv: (kv[0][0] != "full", kv[0][1], kv[0][0])):
    cells = [f"{100 * cell(recs, t):.0f} ({sum(r['task'] == t for r in recs.values())})" if cell(recs, t) is not None
             else "-" for t in TASKS]
    k, n = sum(r["score"] for r in recs.values()), len(recs)
    lo, hi = wilson_interval(k, n)
    ratios = []
    for t in PASSED:
        shared = {i: full[i] for i, r in recs.items() if r["task"] == t and i in full}
        f = cell(shared, t)
        if f:
            ratios.append(cell({i: recs[i] for i in shared}, t) / f)
    target = f"{sum(ratios) / len(ratios):.2f}" if ratios else "-"
    variant = name.endswith((" (calibrated)", " (17 for 16)"))
    base = rows.get((name.rsplit(" (", 1)[0], budget)) if variant else None
    print(f"| {name} | {budget:g} | " + " | ".join(cells) + f" | {n}, {100 * k / n:.1f}, {100 * lo:.0f}–{100 * hi:.0f} "
          f"| {target} | {sign_test(recs, base) if base else ''} |")
