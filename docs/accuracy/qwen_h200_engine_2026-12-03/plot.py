"""accuracy_vs_budget.png of this folder's grid: every (method, budget) row that finished all 280 prompts
(niah_single, niah_multikey, text_recall x 2K/4K/8K/16K, Qwen2.5-Coder-0.5B), scores averaged over lengths, with `sparse_hf.eval`'s own
plot. `python3 plot.py` from this folder (needs matplotlib)."""

import json
import os
from collections import Counter
from pathlib import Path

from sparse_hf.eval.plots import plot_accuracy_vs_budget
from sparse_hf.eval.report import summarize

here = Path(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"scope_layer": " (layer)", "scope_kv_head": " (kv_head)", "omnikv_calibrated": " (calibrated)"}
records = []
for folder in sorted(p for p in here.iterdir() if (p / "predictions.jsonl").exists()):
    for r in map(json.loads, open(folder / "predictions.jsonl")):
        if r["method"] != "full":
            r["method"] += LABELS.get(folder.name, "")
        records.append(r)
complete = {key for key, n in Counter((r["method"], r["budget"]) for r in records).items() if n == 280}
records = [r for r in records if (r["method"], r["budget"]) in complete]
print("rows:", ", ".join(f"{m} @ {b}" for m, b in sorted(complete)))
print(plot_accuracy_vs_budget(summarize(records), here / "accuracy_vs_budget.png"))
