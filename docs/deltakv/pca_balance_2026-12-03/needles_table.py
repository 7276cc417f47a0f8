"""Greedy needles at 4K, budget 0.25, filter layers [0,1,2,3,8,17,22] (CPU engine): the balanced PCA-only compressor
(needles_4k_balanced_pca.jsonl, this folder) against the shipped trained one and OmniKV (same prompts and layers,
../../accuracy/omnikv_text_recall_2026-12-03/l17_4k/) and the full cache (the H200 grid of 2026-12-03).
Usage: python3 needles_table.py [this folder]"""
import json
import os
import sys

from sparse_hf.eval.stats import mcnemar_exact

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
acc = os.path.join(here, "..", "..", "accuracy")


def load(path, method, budget=None):
    rows = (json.loads(line) for line in open(path))
    return {r["id"]: r["score"] for r in rows
            if r["length"] == 4096 and r["method"] == method and (budget is None or r["budget"] == budget)}


runs = {
    "full": load(os.path.join(acc, "smollm2_h200_engine_2026-12-03", "base", "predictions.jsonl"), "full"),
    "omnikv": load(os.path.join(acc, "omnikv_text_recall_2026-12-03", "l17_4k", "omnikv_0.25.jsonl"), "omnikv"),
    "deltakv shipped (plain init, 650 steps)": load(
        os.path.join(acc, "omnikv_text_recall_2026-12-03", "l17_4k", "deltakv_trained_0.25.jsonl"), "deltakv"),
    "deltakv balanced PCA-only": load(os.path.join(here, "needles_4k_balanced_pca.jsonl"), "deltakv"),
}
ids = sorted(set.intersection(*(set(r) for r in runs.values())))
print(f"| cache ({len(ids)} prompts at 4K, 0.25) | niah_single | niah_multikey | all |")
print("|---|---|---|---|")
for name, r in runs.items():
    cells = [sum(r[i] for i in ids if i.startswith(t)) for t in ("niah_single", "niah_multikey")]
    print(f"| {name} | {cells[0]:.0f} | {cells[1]:.0f} | {sum(cells):.0f} |")
a, b = runs["deltakv balanced PCA-only"], runs["deltakv shipped (plain init, 650 steps)"]
wins, losses = sum(a[i] > b[i] for i in ids), sum(a[i] < b[i] for i in ids)
print(f"\nbalanced PCA-only against shipped: {wins} vs {losses} discordant, McNemar p = {mcnemar_exact(wins, losses):.2g}")
