"""Greedy needles at 4K / 0.25 (CPU engine): the shipped demo compressor with filter layers [0,1,2,3,8,17,23] (layer 23 pinned
by calibrate --deltakv-path) against the same prompts with [0,1,2,3,8,17,22], OmniKV and the full cache.
Usage (repository root): python3 docs/deltakv/qwen_layers_2026-12-03/demo_needles_table.py docs/deltakv/qwen_layers_2026-12-03/demo_needles_4k_l23.jsonl"""
import json, sys
from sparse_hf.eval.stats import mcnemar_exact
acc="docs/accuracy"
def load(path, method):
    return {r["id"]: r["score"] for r in map(json.loads, open(path)) if r["length"]==4096 and r["method"]==method}
new = load(sys.argv[1], "deltakv")
runs = {"full": load(f"{acc}/smollm2_h200_engine_2026-12-03/base/predictions.jsonl","full"),
 "omnikv [..17,22]": load(f"{acc}/omnikv_text_recall_2026-12-03/l17_4k/omnikv_0.25.jsonl","omnikv"),
 "deltakv shipped [..17,22]": load(f"{acc}/omnikv_text_recall_2026-12-03/l17_4k/deltakv_trained_0.25.jsonl","deltakv")}
ids = sorted(new)
print("prompts", len(ids), "deltakv shipped [0,1,2,3,8,17,23]:", sum(new[i] for i in ids))
for k,v in runs.items():
    a=sum(new[i]>v[i] for i in ids); b=sum(v[i]>new[i] for i in ids)
    print(f"{k}: {sum(v[i] for i in ids)}; new right/other wrong {a}, reverse {b}, p={mcnemar_exact(a,b):.3g}")
