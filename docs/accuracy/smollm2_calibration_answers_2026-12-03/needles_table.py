"""Greedy needles at 4K, budget 0.25 (CPU engine, SmolLM2-135M): OmniKV with the filter layers that
``calibrate --append-answers`` chose (``needles_4k_omnikv_ans.jsonl``, this folder) against the hand-found
``[0,1,2,3,8,17,22]`` (../omnikv_text_recall_2026-12-03/l17_4k/) and the full cache (the H200 grid of 2026-12-03),
on the same 60 prompts. Usage: python3 needles_table.py [this folder]"""
import json
import os
import sys

from sparse_hf.eval.stats import mcnemar_exact

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
acc = os.path.join(here, "..")


def load(path, method, budget=None):
    rows = (json.loads(line) for line in open(path))
    return {r["id"]: r["score"] for r in rows
            if r["length"] == 4096 and r["method"] == method and (budget is None or r["budget"] == budget)}


runs = {
    "full": load(os.path.join(acc, "smollm2_h200_engine_2026-12-03", "base", "predictions.jsonl"), "full"),
    "omnikv [0,1,2,3,8,17,22] (hand-found)": load(
        os.path.join(acc, "omnikv_text_recall_2026-12-03", "l17_4k", "omnikv_0.25.jsonl"), "omnikv", 0.25),
    "omnikv [0,3,12,17,21,27,28] (calibrate --append-answers)": load(
        os.path.join(here, "needles_4k_omnikv_ans.jsonl"), "omnikv", 0.25),
}
ids = sorted(set.intersection(*(set(r) for r in runs.values())))
print(f"| cache ({len(ids)} prompts at 4K, 0.25) | niah_single | niah_multikey | all |")
print("|---|---|---|---|")
for name, r in runs.items():
    cells = [sum(r[i] for i in ids if i.startswith(t)) for t in ("niah_single", "niah_multikey")]
    print(f"| {name} | {cells[0]:.0f} | {cells[1]:.0f} | {sum(cells):.0f} |")
names = list(runs)
for a_name, b_name in ((names[2], names[1]), (names[2], names[0])):
    a, b = runs[a_name], runs[b_name]
    wins, losses = sum(a[i] > b[i] for i in ids), sum(a[i] < b[i] for i in ids)
    print(f"\n{a_name} against {b_name}: {wins} vs {losses} discordant, McNemar p = {mcnemar_exact(wins, losses):.2g}")
