"""Table of DeltaKV (and OmniKV) with fewer filter layers against the default 7, on the 70 prompts of
../smollm2_cpu_b025_2026-12-02 (whose full, deltakv and omnikv predictions are reused): per task score (Wilson 95%),
full's correct kept, and the paired comparison with the same method at the default layers (McNemar exact, two-sided).

Run from this folder: ``python table.py``."""
import json
from sparse_hf.eval.stats import mcnemar_exact, wilson_interval as wilson
import math
import os

TASKS = ["niah_single", "niah_multikey", "text_recall"]
DEFAULT = [0, 1, 2, 3, 8, 16, 22]     # DEFAULT_FULL_ATTN_LAYERS, what the earlier runs used (no full_attn_layers set)
REF = os.path.join("..", "smollm2_cpu_b025_2026-12-02")
# KV bytes over full's at 131072 x 1, Qwen2.5-7B shape, int4 latent-256, budget 0.1, by filter-layer count
# (docs/deltakv/hf_bytes_and_launches.md, "Fewer filter layers"); OmniKV and full keep every token raw: 1.
KV_RATIO = {7: "0.388", 4: "0.298", 3: "0.268"}
# (label, folder, method's default-layer run to pair with)
RUNS = [("full", os.path.join(REF, "full"), None),
        ("deltakv, default 7 layers", os.path.join(REF, "deltakv"), None),
        ("deltakv, calibrated 4", "deltakv_f4", os.path.join(REF, "deltakv")),
        ("deltakv, calibrated 3", "deltakv_f3", os.path.join(REF, "deltakv")),
        ("omnikv, default 7 layers", os.path.join(REF, "omnikv"), None),
        ("omnikv, calibrated 4", "omnikv_f4", os.path.join(REF, "omnikv")),
        ("omnikv, calibrated 3 (niah_single only)", "omnikv_f3", os.path.join(REF, "omnikv"))]




def load(folder):
    path = os.path.join(folder, "predictions.jsonl")
    if not os.path.exists(path):
        return {}
    return {(r["task"], r["id"], r["depth"]): r for r in map(json.loads, open(path))}


def layers_of(rows):
    cfg = next(iter(rows.values())).get("cache_config") or {}
    if next(iter(rows.values()))["method"] == "full":
        return "all 30"
    return cfg.get("full_attn_layers", DEFAULT)


full = load(RUNS[0][1])
print("| configuration | filter layers | KV ratio at 128K (7B shape) | " + " | ".join(f"{t} (n, score, 95% CI)" for t in TASKS)
      + " | all 70 (score, 95% CI) | full's correct kept | vs default layers: gained / lost (McNemar exact p) |")
print("|---" * (len(TASKS) + 6) + "|")
for label, folder, ref_folder in RUNS:
    rows = load(folder)
    if not rows:
        continue
    cells = []
    for t in TASKS:
        rs = [r for r in rows.values() if r["task"] == t]
        k, n = sum(r["score"] for r in rs), len(rs)
        lo, hi = wilson(k, n)
        cells.append(f"{n}, {100 * k / n:.1f}, {100 * lo:.0f}–{100 * hi:.0f}" if n else "not run")
    k, n = sum(r["score"] for r in rows.values()), len(rows)
    lo, hi = wilson(k, n)
    overall = f"{100 * k / n:.1f}, {100 * lo:.0f}–{100 * hi:.0f}" + ("" if n == 70 else f" (n = {n})")
    both = [key for key, r in full.items() if r["score"] == 1 and key in rows]
    kept = int(sum(rows[key]["score"] for key in both))
    klo, khi = wilson(kept, len(both))
    paired = "–"
    if ref_folder:
        ref = load(ref_folder)
        common = [key for key in rows if key in ref]
        assert len(common) == len(rows), "prompts the default-layer run does not have"   # a partial run: fewer
        for key in common:   # the same prompt text: same task, id and depth, same prompt length
            assert rows[key]["prompt_tokens"] == ref[key]["prompt_tokens"], key
        b = sum(1 for key in common if rows[key]["score"] == 1 and ref[key]["score"] == 0)
        c = sum(1 for key in common if rows[key]["score"] == 0 and ref[key]["score"] == 1)
        paired = f"+{b} / −{c} (p = {mcnemar_exact(b, c):.2g})" + ("" if len(common) == len(ref) else f", {len(common)} prompts")
    layers = layers_of(rows)
    ratio = KV_RATIO[len(layers)] if label.startswith("deltakv") else "1"
    print(f"| {label} | {layers} | {ratio} | " + " | ".join(cells) + f" | {overall} | {kept}/{len(both)} "
          f"({100 * kept / max(1, len(both)):.0f}%, {100 * klo:.0f}–{100 * khi:.0f}) | {paired} |")
