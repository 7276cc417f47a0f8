"""Paired 2K comparison (issue 12/14): full, omnikv@0.25 and deltakv@0.25 from the 2026-12-02 runs, deltakv with every
compressed token rebuilt from this folder. Run from this folder: python3 table.py"""
import json

from sparse_hf.eval.stats import mcnemar_exact as mcnemar

A, C = "../../accuracy/smollm2_h200_engine_2026-12-02/", "../../accuracy/smollm2_cpu_engine_2k_2026-12-02/"
ROWS = {"full": (A + "base/predictions.jsonl", "full", None),
        "omnikv 0.25 (CPU)": (C + "omnikv/predictions.jsonl", "omnikv", 0.25),
        "deltakv 0.25 (H200)": (A + "deltakv/predictions.jsonl", "deltakv", 0.25),
        "deltakv, every token rebuilt (CPU)": ("deltakv_all_rebuilt/predictions.jsonl", "deltakv", 0.25),
        "deltakv 0.25, layers 23,24 raw too (CPU)": ("deltakv_L2324/predictions.jsonl", "deltakv", 0.25)}
TASKS = ("niah_single", "niah_multikey", "text_recall")


def load(path, method, budget):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r["length"] == 2048 and r["method"] == method and (budget is None or r["budget"] == budget):
            out[r["id"]] = r["score"]
    return out



data = {k: load(*v) for k, v in ROWS.items()}
full = data["full"]
print("| cache | prompts | " + " | ".join(TASKS) + " | all | vs full: lost / gained, McNemar p |")
print("|---|---|" + "---|" * (len(TASKS) + 2))
for name, d in data.items():
    ids = sorted(set(d) & set(full))
    cells = []
    for t in TASKS:
        ti = [i for i in ids if i.startswith(t)]
        cells.append(f"{100 * sum(d[i] for i in ti) / len(ti):.0f} ({len(ti)})" if ti else "-")
    lost = sum(full[i] > d[i] for i in ids)
    gained = sum(d[i] > full[i] for i in ids)
    print(f"| {name} | {len(ids)} | " + " | ".join(cells) + f" | {100 * sum(d[i] for i in ids) / len(ids):.1f} | "
          f"{lost} / {gained}, p={mcnemar(lost, gained):.3g} |")
print()
pairs = [("omnikv 0.25 (CPU)", "deltakv 0.25 (H200)"), ("deltakv, every token rebuilt (CPU)", "deltakv 0.25 (H200)"),
         ("omnikv 0.25 (CPU)", "deltakv, every token rebuilt (CPU)"),
         ("deltakv 0.25, layers 23,24 raw too (CPU)", "deltakv 0.25 (H200)"),
         ("omnikv 0.25 (CPU)", "deltakv 0.25, layers 23,24 raw too (CPU)")]
for a, b in pairs:
    ids = sorted(set(data[a]) & set(data[b]))
    x = sum(data[a][i] > data[b][i] for i in ids)
    y = sum(data[b][i] > data[a][i] for i in ids)
    print(f"- {a} vs {b}, {len(ids)} prompts: {sum(data[a][i] for i in ids):.0f} vs {sum(data[b][i] for i in ids):.0f} "
          f"correct; only the first {x}, only the second {y}, McNemar exact p={mcnemar(x, y):.3g}")

# Teacher-forced answer NLL (benchmarks/deltakv_answer_nll.py): mean per answer token, per prompt and cache
import os  # noqa: E402

rows = {}
for f in ("answer_nll.json", "answer_nll2.json", "answer_nll3.json"):
    if os.path.exists(f):
        for r in json.load(open(f))["rows"]:
            rows[(r["id"], r["config"])] = r
ids = sorted({i for i, _ in rows}, key=lambda i: (i.split("-")[0] != "niah_single", i.split("-")[0], i))
cfgs = list(dict.fromkeys(c for _, c in rows))
if rows:
    print()
    print("| prompt | " + " | ".join(cfgs) + " |")
    print("|---|" + "---|" * len(cfgs))
    for i in ids:
        print(f"| {i} | " + " | ".join(f"{rows[(i, c)]['nll']:.3f}" if (i, c) in rows else "-" for c in cfgs) + " |")
    for label, pick in (("mean, niah", lambda i: i.startswith("niah")), ("mean, all", lambda i: True)):
        cells = []
        for c in cfgs:
            v = [rows[(i, c)]["nll"] for i in ids if pick(i) and (i, c) in rows]
            cells.append(f"{sum(v) / len(v):.3f} ({len(v)})" if v else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    base = [i for i in ids if all((i, c) in rows for c in ("full", "omnikv", "deltakv"))]
    for a, b in (("deltakv", "omnikv"), ("all_rebuilt", "full"), ("omnikv", "full"), ("all_raw23to29", "all_rebuilt"),
                 ("all_raw23_24", "all_rebuilt"), ("all_raw23_24", "full"), ("deltakv_L2324", "omnikv_L2324"),
                 ("deltakv_L2324", "deltakv"), ("omnikv_L2324", "omnikv")):
        both = [i for i in ids if (i, a) in rows and (i, b) in rows]
        worse = sum(rows[(i, a)]["nll"] > rows[(i, b)]["nll"] for i in both)
        if both:
            print(f"- {a} above {b} on {worse} of {len(both)} prompts; mean {a} - {b}: "
                  f"{sum(rows[(i, a)]['nll'] - rows[(i, b)]['nll'] for i in both) / len(both):+.3f}")
