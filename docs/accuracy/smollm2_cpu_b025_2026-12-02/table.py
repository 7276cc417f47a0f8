"""Tables of the CPU 0.25-budget slice: per task score (Wilson 95%), the ratio to full over tasks, and the share of
the full cache's correct samples each method also gets right (paired on the same prompts)."""
from sparse_hf.eval.stats import wilson_interval as wilson
import json, math, os, sys

root = sys.argv[1] if len(sys.argv) > 1 else "."
TASKS = ["niah_single", "niah_multikey", "text_recall"]



def load(name):
    path = os.path.join(root, name, "predictions.jsonl")
    return {(r["task"], r["id"], r["depth"]): r for r in map(json.loads, open(path))} if os.path.exists(path) else {}


full = load("full")
names = ["full", "snapkv", "snapkv_kvhead", "pyramidkv", "knorm", "h2o", "omnikv", "deltakv", "streamingllm"]
print("| method | " + " | ".join(f"{t} (n, score, 95% CI)" for t in TASKS) + " | mean score / full's (all three) | mean / full's (niah_single + text_recall) | full's correct kept | kept/layer | read/layer | layers reading all |")
print("|---" * (len(TASKS) + 7) + "|")
for name in names:
    rows = load(name)
    if not rows:
        continue
    cells, scores = [], {}
    for t in TASKS:
        rs = [r for r in rows.values() if r["task"] == t]
        k, n = sum(r["score"] for r in rs), len(rs)
        lo, hi = wilson(k, n)
        scores[t] = k / n if n else float("nan")
        cells.append(f"{n}, {100 * k / n:.1f}, {100 * lo:.0f}–{100 * hi:.0f}" if n else "-")
    fs = {t: sum(r["score"] for r in full.values() if r["task"] == t) / max(1, sum(1 for r in full.values() if r["task"] == t)) for t in TASKS}
    ratio_all = sum(scores.values()) / sum(fs.values())
    ratio_pass = (scores["niah_single"] + scores["text_recall"]) / (fs["niah_single"] + fs["text_recall"])
    both = [key for key, r in full.items() if r["score"] == 1 and key in rows]
    kept = sum(rows[key]["score"] for key in both)
    lo, hi = wilson(kept, len(both))
    rs = list(rows.values())
    mean = lambda f: sum(r[f] or 0 for r in rs) / len(rs)
    print(f"| {name} | " + " | ".join(cells) + f" | {ratio_all:.2f} | {ratio_pass:.2f} | {int(kept)}/{len(both)} ({100 * kept / max(1, len(both)):.0f}%, {100 * lo:.0f}–{100 * hi:.0f}) | {mean('kept_tokens'):.0f} | {mean('read_tokens'):.0f} | {mean('full_layer_share'):.2f} |")
