"""R1 (the DeltaKV compressor for the demo model trained 150 steps on the H200 from the K/V-balanced PCA init; it
ships as ``deltakv_path="demo"`` since 2026-12-04) against the compressor shipped before it (plain PCA init, 650
steps), the balanced PCA-only init and R0 (balanced init, 650 steps): teacher-forced answer NLL on the 14 prompts at
2K of the earlier studies (answer_nll_r1.json here; the other rows from ../quality_2026-12-03/,
../pca_balance_2026-12-03/ and ../r0_2026-12-03/). Greedy retrieval on the whole engine grid is in
docs/accuracy/smollm2_h200_engine_2026-12-04/ (docs/accuracy.md "run Y").
Usage: python3 table.py [this folder]"""
import os
import sys

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, ".."))
from study_tables import answer_nll_rows, print_answer_nll  # noqa: E402

old = os.path.join(here, "..", "quality_2026-12-03")
bal = os.path.join(here, "..", "pca_balance_2026-12-03")
r0 = os.path.join(here, "..", "r0_2026-12-03")
rows = answer_nll_rows([os.path.join(old, f) for f in ("answer_nll.json", "answer_nll2.json", "answer_nll3.json")]
                       + [os.path.join(bal, "answer_nll.json"), os.path.join(bal, "answer_nll_shipped.json"),
                          os.path.join(r0, "answer_nll_r0.json"), os.path.join(here, "answer_nll_r1.json")])
ids = sorted(rows["r1_all"])
print(f"## Answer NLL per token, {len(ids)} prompts at 2K (teacher-forced, float32, 2-core CPU)\n")
print_answer_nll(rows, ids, ["full", "omnikv", "shipped_all", "balanced_all", "r0_all", "r1_all", "shipped_025",
                             "balanced_025", "r0_025", "r1_025"],
                 [("r1_all", "shipped_all"), ("r1_025", "shipped_025"), ("r1_all", "balanced_all"),
                  ("r1_025", "balanced_025"), ("r1_025", "r0_025")], bullet="- ")
