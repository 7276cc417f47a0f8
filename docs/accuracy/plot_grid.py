"""accuracy_vs_budget.png of an engine grid folder (one ``<lane>/predictions.jsonl`` per lane, as
``benchmarks/accuracy_grid.sh`` writes them): every (method, budget) row that finished all ``--prompts`` prompts,
scores averaged over lengths, drawn with `sparse_hf.eval`'s own plot into the folder. Needs matplotlib.

    python3 plot_grid.py smollm2_h200_engine_2026-12-03 --prompts 210 --label "deltakv= (PCA-only compressor)"
    python3 plot_grid.py qwen_h200_engine_2026-12-03 --prompts 280
    python3 plot_grid.py smollm2_h200_engine_2026-12-04 --prompts 210 --include 'full|pool7' --out pooling.png

``--include`` / ``--exclude``: regular expressions over the row names (``"omnikv (pool7, layers 0,1,2)"``) that keep
or drop rows, so that one folder's many lanes can be drawn as several readable figures.
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from sparse_hf.eval.plots import plot_accuracy_vs_budget
from sparse_hf.eval.report import lane_label, summarize

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("folder", type=Path)
p.add_argument("--prompts", type=int, required=True, help="prompts of a complete (method, budget) row")
p.add_argument("--label", action="append", default=[], metavar="LANE=SUFFIX", help="a lane's suffix to its methods")
p.add_argument("--include", help="keep only the rows whose name matches this regular expression")
p.add_argument("--exclude", help="drop the rows whose name matches this regular expression")
p.add_argument("--out", default="accuracy_vs_budget.png", help="file name in the folder")
args = p.parse_args()
labels = {d.name: f" ({lane_label(d.name)})" for d in args.folder.iterdir() if lane_label(d.name)}
labels.update(item.split("=", 1) for item in args.label)
records = []
for lane in sorted(d for d in args.folder.iterdir() if (d / "predictions.jsonl").exists()):
    for r in map(json.loads, open(lane / "predictions.jsonl")):
        if r["method"] != "full":
            r["method"] += labels.get(lane.name, "")
        records.append(r)
complete = {key for key, n in Counter((r["method"], r["budget"]) for r in records).items() if n == args.prompts
            and (args.include is None or re.search(args.include, key[0]))
            and (args.exclude is None or not re.search(args.exclude, key[0]))}
records = [r for r in records if (r["method"], r["budget"]) in complete]
print("rows:", ", ".join(f"{m} @ {b}" for m, b in sorted(complete)))
print(plot_accuracy_vs_budget(summarize(records), args.folder / args.out))
