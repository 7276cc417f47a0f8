"""Teacher-forced answer NLL of the K/V-balanced PCA init against the plain one (14 prompts at 2K), with the full
cache's and OmniKV's from the earlier runs on the same prompts (../quality_2026-12-03/answer_nll*.json), and the
shipped demo compressor's (plain init trained 650 steps on the H200; answer_nll_shipped.json).
Usage: python3 table.py [this folder]"""
import json
import os
import sys

from sparse_hf.eval.stats import mcnemar_exact

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
old = os.path.join(here, "..", "quality_2026-12-03")
rows = {}
for path in [os.path.join(old, f) for f in ("answer_nll.json", "answer_nll2.json", "answer_nll3.json")] + \
        [os.path.join(here, "answer_nll.json"), os.path.join(here, "answer_nll_shipped.json")]:
    if os.path.exists(path):
        for r in json.load(open(path))["rows"]:
            rows.setdefault(r["config"], {})[r["id"]] = r
ids = sorted(rows["balanced_all"])
cols = ["full", "omnikv", "pca_all", "balanced_all", "shipped_all", "pca_025", "balanced_025", "shipped_025"]
print("| prompt | " + " | ".join(cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for i in ids:
    print(f"| {i} | " + " | ".join(f"{rows[c][i]['nll']:.3f}" if i in rows.get(c, {}) else "-" for c in cols) + " |")
for c in cols:
    got = [rows[c][i] for i in ids if i in rows.get(c, {})]
    if got:
        print(f"{c}: mean NLL {sum(r['nll'] for r in got) / len(got):.3f} over {len(got)}, answer all argmax "
              f"{sum(r['all_argmax'] for r in got)}/{len(got)}")
for a, b in (("balanced_all", "pca_all"), ("balanced_025", "pca_025"), ("shipped_all", "pca_all"),
             ("shipped_025", "pca_025"), ("balanced_all", "shipped_all"), ("balanced_025", "shipped_025")):
    if a not in rows or b not in rows:
        continue
    diff = [rows[a][i]["nll"] - rows[b][i]["nll"] for i in ids]
    better = sum(x < 0 for x in diff)
    print(f"{a} - {b}: mean {sum(diff) / len(diff):+.3f} nats/token, lower on {better} of {len(diff)} prompts "
          f"(sign test p = {mcnemar_exact(better, len(diff) - better):.2g})")
