"""Run R0 (DeltaKV compressor for the demo model trained 650 steps on the H200 from the K/V-balanced PCA init,
`--pca_balance kv`, otherwise the shipped demo compressor's recipe; r0_config.json, r0_card.md) against the shipped
demo compressor and the balanced PCA-only init of ../pca_balance_2026-12-03/, on the same prompts:
(a) teacher-forced answer NLL on 14 prompts at 2K (answer_nll_r0.json here; full and OmniKV from
    ../quality_2026-12-03/answer_nll*.json, shipped and balanced PCA-only from ../pca_balance_2026-12-03/);
(b) greedy needles at 4K, budget 0.25, filter layers [0,1,2,3,8,17,22], CPU engine (needles_4k_r0.jsonl here;
    the other rows from the sources ../pca_balance_2026-12-03/needles_table.py reads).
Usage: python3 table.py [this folder]"""
import json
import os
import sys

from sparse_hf.eval.stats import mcnemar_exact

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
old = os.path.join(here, "..", "quality_2026-12-03")
bal = os.path.join(here, "..", "pca_balance_2026-12-03")
acc = os.path.join(here, "..", "..", "accuracy")

# (a) answer NLL ---------------------------------------------------------------------------------------------------
rows = {}
for path in [os.path.join(old, f) for f in ("answer_nll.json", "answer_nll2.json", "answer_nll3.json")] + \
        [os.path.join(bal, "answer_nll.json"), os.path.join(bal, "answer_nll_shipped.json"),
         os.path.join(here, "answer_nll_r0.json")]:
    if os.path.exists(path):
        for r in json.load(open(path))["rows"]:
            rows.setdefault(r["config"], {})[r["id"]] = r
ids = sorted(rows["r0_all"])
cols = ["full", "omnikv", "shipped_all", "balanced_all", "r0_all", "shipped_025", "balanced_025", "r0_025"]
print(f"## (a) Answer NLL per token, {len(ids)} prompts at 2K (teacher-forced, float32)\n")
print("| prompt | " + " | ".join(cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for i in ids:
    print(f"| {i} | " + " | ".join(f"{rows[c][i]['nll']:.3f}" if i in rows.get(c, {}) else "-" for c in cols) + " |")
print()
for c in cols:
    got = [rows[c][i] for i in ids if i in rows.get(c, {})]
    if got:
        print(f"- {c}: mean NLL {sum(r['nll'] for r in got) / len(got):.3f} over {len(got)}, answer all argmax "
              f"{sum(r['all_argmax'] for r in got)}/{len(got)}")
print()
for a, b in (("r0_all", "shipped_all"), ("r0_025", "shipped_025"), ("r0_all", "balanced_all"),
             ("r0_025", "balanced_025")):
    if a not in rows or b not in rows:
        continue
    diff = [rows[a][i]["nll"] - rows[b][i]["nll"] for i in ids]
    better = sum(x < 0 for x in diff)
    print(f"- {a} - {b}: mean {sum(diff) / len(diff):+.3f} nats/token, lower on {better} of {len(diff)} prompts "
          f"(sign test p = {mcnemar_exact(better, len(diff) - better):.2g})")


# (b) needles --------------------------------------------------------------------------------------------------------
def load(path, method, budget=None):
    rows = (json.loads(line) for line in open(path))
    return {r["id"]: r["score"] for r in rows
            if r["length"] == 4096 and r["method"] == method and (budget is None or r["budget"] == budget)}


l17 = os.path.join(acc, "omnikv_text_recall_2026-12-03", "l17_4k")
runs = {
    "full": load(os.path.join(acc, "smollm2_h200_engine_2026-12-03", "base", "predictions.jsonl"), "full"),
    "omnikv": load(os.path.join(l17, "omnikv_0.25.jsonl"), "omnikv"),
    "deltakv shipped (plain init, 650 steps)": load(os.path.join(l17, "deltakv_trained_0.25.jsonl"), "deltakv"),
    "deltakv balanced PCA-only": load(os.path.join(bal, "needles_4k_balanced_pca.jsonl"), "deltakv"),
    "deltakv R0 (balanced init, 650 steps)": load(os.path.join(here, "needles_4k_r0.jsonl"), "deltakv"),
}
ids = sorted(set.intersection(*(set(r) for r in runs.values())))
print(f"\n## (b) Greedy needles at 4K, budget 0.25, filter layers [0,1,2,3,8,17,22], CPU engine\n")
print(f"| cache ({len(ids)} prompts at 4K, 0.25) | niah_single | niah_multikey | all |")
print("|---|---|---|---|")
for name, r in runs.items():
    cells = [sum(r[i] for i in ids if i.startswith(t)) for t in ("niah_single", "niah_multikey")]
    print(f"| {name} | {cells[0]:.0f} | {cells[1]:.0f} | {sum(cells):.0f} |")
print()
r0 = runs["deltakv R0 (balanced init, 650 steps)"]
for name in ("deltakv shipped (plain init, 650 steps)", "deltakv balanced PCA-only"):
    b = runs[name]
    wins, losses = sum(r0[i] > b[i] for i in ids), sum(r0[i] < b[i] for i in ids)
    print(f"- R0 against {name}: {wins} vs {losses} discordant, McNemar p = {mcnemar_exact(wins, losses):.2g}")
