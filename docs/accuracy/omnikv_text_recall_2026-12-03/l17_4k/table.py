"""omnikv with filter layers [0,1,2,3,8,17,22] at 4K (CPU engine, this folder) against the default layers and the
full cache on the same prompts (the H200 grid of 2026-12-03): `python3 table.py` from this folder."""

import json
import os

from sparse_hf.eval.stats import mcnemar_exact

here = os.path.dirname(os.path.abspath(__file__))
grid = os.path.join(here, "..", "..", "smollm2_h200_engine_2026-12-03")


def load(path, method, budget=None):
    if not os.path.exists(path):
        return {}
    rows = (json.loads(line) for line in open(path))
    return {r["id"]: r["score"] for r in rows
            if r["length"] == 4096 and r["method"] == method and (budget is None or r["budget"] == budget)}


full = load(os.path.join(grid, "base", "predictions.jsonl"), "full")
for budget in (0.1, 0.25):
    mine = load(os.path.join(here, f"omnikv_{budget}.jsonl"), "omnikv")
    default = load(os.path.join(grid, "omnikv", "predictions.jsonl"), "omnikv", budget)
    if mine and not default:   # the grid has no default-layer row at this budget and length: against full only
        ids = [i for i in mine if i in full]
        wins = sum(1 for i in ids if mine[i] > full[i])
        losses = sum(1 for i in ids if mine[i] < full[i])
        print(f"omnikv @ {budget} (17 for 16 / full; no default-layer row): {sum(mine[i] for i in ids):.0f}/"
              f"{sum(full[i] for i in ids):.0f} of {len(ids)}; {wins} vs {losses}, McNemar p = {mcnemar_exact(wins, losses):.2g}")
        continue
    ids = [i for i in mine if i in full and i in default]
    if not ids:
        continue
    cells = []
    for task in ("niah_single", "niah_multikey"):
        t = [i for i in ids if i.startswith(task)]
        cells.append(f"{task} {sum(mine[i] for i in t):.0f}/{sum(default[i] for i in t):.0f}/{sum(full[i] for i in t):.0f}"
                     f" of {len(t)}")
    wins = sum(1 for i in ids if mine[i] > default[i])
    losses = sum(1 for i in ids if mine[i] < default[i])
    print(f"omnikv @ {budget} (17 for 16 / default / full): " + ", ".join(cells)
          + f"; all {sum(mine[i] for i in ids):.0f}/{sum(default[i] for i in ids):.0f}/{sum(full[i] for i in ids):.0f}"
          f" of {len(ids)}; {wins} vs {losses} against the default, McNemar p = {mcnemar_exact(wins, losses):.2g}")
