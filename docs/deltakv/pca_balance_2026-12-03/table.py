"""Teacher-forced answer NLL of the K/V-balanced PCA init against the plain one (14 prompts at 2K), with the full
cache's and OmniKV's from the earlier runs on the same prompts (../quality_2026-12-03/answer_nll*.json), and the
shipped demo compressor's (plain init trained 650 steps on the H200; answer_nll_shipped.json).
Usage: python3 table.py [this folder]"""
import os
import sys

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, ".."))
from study_tables import answer_nll_rows, print_answer_nll  # noqa: E402

old = os.path.join(here, "..", "quality_2026-12-03")
rows = answer_nll_rows([os.path.join(old, f) for f in ("answer_nll.json", "answer_nll2.json", "answer_nll3.json")]
                       + [os.path.join(here, "answer_nll.json"), os.path.join(here, "answer_nll_shipped.json")])
print_answer_nll(rows, sorted(rows["balanced_all"]),
                 ["full", "omnikv", "pca_all", "balanced_all", "shipped_all", "pca_025", "balanced_025", "shipped_025"],
                 [("balanced_all", "pca_all"), ("balanced_025", "pca_025"), ("shipped_all", "pca_all"),
                  ("shipped_025", "pca_025"), ("balanced_all", "shipped_all"), ("balanced_025", "shipped_025")])
