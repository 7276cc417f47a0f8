"""Tables of the H200 engine grid of 2026-12-02 (partial: each lane stopped at 420 s). One row per lane x method x
budget: per task and length the samples done and the score; over every prompt done, the score with Wilson's 95%
interval and, paired on the same prompts, how many of the full cache's correct answers the row also gets.
Usage: python3 table.py [folder] (also the folder of run P's resumed grid, ../smollm2_h200_engine_2026-12-03, and
run T's Qwen grid, ../qwen_h200_engine_2026-12-03)"""
from sparse_hf.eval.report import lane_label
from sparse_hf.eval.stats import wilson_interval as wilson
import json, math, os, sys
from collections import defaultdict

root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
TASKS = ["niah_single", "niah_multikey", "text_recall"]
rows = defaultdict(dict)
for lane in sorted(os.listdir(root)):       # every lane folder; lane_label keeps two lanes of one method apart
    path, scope = os.path.join(root, lane, "predictions.jsonl"), lane_label(lane)
    if not os.path.exists(path):
        continue
    for r in map(json.loads, open(path)):
        name = r["method"] + (f" ({scope})" if scope else "")
        rows[(name, r["budget"])][r["id"]] = r
full = rows[("full", 1.0)]
LENGTHS = sorted({r["length"] for r in full.values()})   # 2K-8K for SmolLM2, 2K-16K for Qwen
head = " | ".join(f"{t[:11]} {L // 1024}K" for t in TASKS for L in LENGTHS)
print(f"| method | budget | {head} | all done: n, score, 95% CI | full's correct kept | kept/layer | read/layer |")
print("|---" * (len(TASKS) * len(LENGTHS) + 6) + "|")
for (name, budget), recs in sorted(rows.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], kv[0][1])):
    cells = []
    for t in TASKS:
        for L in LENGTHS:
            rs = [r for r in recs.values() if r["task"] == t and r["length"] == L]
            cells.append(f"{sum(r['score'] for r in rs) / len(rs) * 100:.0f} ({len(rs)})" if rs else "-")
    k, n = sum(r["score"] for r in recs.values()), len(recs)
    lo, hi = wilson(k, n)
    both = [i for i, r in full.items() if r["score"] == 1 and i in recs]
    kept = sum(recs[i]["score"] for i in both)
    def mean(f):
        values = [r[f] for r in recs.values() if r[f] is not None]
        return f"{sum(values) / len(values):.0f}" if values else "-"   # DeltaKV's engine reads are not reported
    print(f"| {name} | {budget:g} | " + " | ".join(cells) + f" | {n}, {100 * k / n:.1f}, {100 * lo:.0f}–{100 * hi:.0f} | "
          f"{int(kept)}/{len(both)} | {mean('kept_tokens')} | {mean('read_tokens')} |")
