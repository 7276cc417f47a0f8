"""Run R0 (DeltaKV compressor for the demo model trained 650 steps on the H200 from the K/V-balanced PCA init,
`--pca_balance kv`, otherwise the shipped demo compressor's recipe; r0_config.json, r0_card.md) against the shipped
demo compressor and the balanced PCA-only init of ../pca_balance_2026-12-03/, on the same prompts:
(a) teacher-forced answer NLL on 14 prompts at 2K (answer_nll_r0.json here; full and OmniKV from
    ../quality_2026-12-03/answer_nll*.json, shipped and balanced PCA-only from ../pca_balance_2026-12-03/);
(b) greedy needles at 4K, budget 0.25, filter layers [0,1,2,3,8,17,22], CPU engine (needles_4k_r0.jsonl here;
    the other rows from the sources ../pca_balance_2026-12-03/needles_table.py reads).
Usage: python3 table.py [this folder]"""
import os
import sys

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, ".."))
from study_tables import FULL_4K, L17_4K, answer_nll_rows, needles, print_answer_nll, print_needles  # noqa: E402

old = os.path.join(here, "..", "quality_2026-12-03")
bal = os.path.join(here, "..", "pca_balance_2026-12-03")

# (a) answer NLL ---------------------------------------------------------------------------------------------------
rows = answer_nll_rows([os.path.join(old, f) for f in ("answer_nll.json", "answer_nll2.json", "answer_nll3.json")]
                       + [os.path.join(bal, "answer_nll.json"), os.path.join(bal, "answer_nll_shipped.json"),
                          os.path.join(here, "answer_nll_r0.json")])
ids = sorted(rows["r0_all"])
print(f"## (a) Answer NLL per token, {len(ids)} prompts at 2K (teacher-forced, float32)\n")
print_answer_nll(rows, ids, ["full", "omnikv", "shipped_all", "balanced_all", "r0_all", "shipped_025", "balanced_025",
                             "r0_025"],
                 [("r0_all", "shipped_all"), ("r0_025", "shipped_025"), ("r0_all", "balanced_all"),
                  ("r0_025", "balanced_025")], bullet="- ")

# (b) needles --------------------------------------------------------------------------------------------------------
R0 = "deltakv R0 (balanced init, 650 steps)"
runs = {
    "full": needles(FULL_4K, "full"),
    "omnikv": needles(os.path.join(L17_4K, "omnikv_0.25.jsonl"), "omnikv"),
    "deltakv shipped (plain init, 650 steps)": needles(os.path.join(L17_4K, "deltakv_trained_0.25.jsonl"), "deltakv"),
    "deltakv balanced PCA-only": needles(os.path.join(bal, "needles_4k_balanced_pca.jsonl"), "deltakv"),
    R0: needles(os.path.join(here, "needles_4k_r0.jsonl"), "deltakv"),
}
print("\n## (b) Greedy needles at 4K, budget 0.25, filter layers [0,1,2,3,8,17,22], CPU engine\n")
print_needles(runs, [(R0, name, f"R0 against {name}") for name in ("deltakv shipped (plain init, 650 steps)",
                                                                   "deltakv balanced PCA-only")], bullet="- ")
