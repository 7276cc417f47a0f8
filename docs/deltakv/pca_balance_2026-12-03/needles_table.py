"""Greedy needles at 4K, budget 0.25, filter layers [0,1,2,3,8,17,22] (CPU engine): the balanced PCA-only compressor
(needles_4k_balanced_pca.jsonl, this folder) against the shipped trained one and OmniKV (same prompts and layers,
../../accuracy/omnikv_text_recall_2026-12-03/l17_4k/) and the full cache (the H200 grid of 2026-12-03).
Usage: python3 needles_table.py [this folder]"""
import os
import sys

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, ".."))
from study_tables import FULL_4K, L17_4K, needles, print_needles  # noqa: E402

runs = {
    "full": needles(FULL_4K, "full"),
    "omnikv": needles(os.path.join(L17_4K, "omnikv_0.25.jsonl"), "omnikv", 0.25),
    "deltakv shipped (plain init, 650 steps)": needles(os.path.join(L17_4K, "deltakv_trained_0.25.jsonl"), "deltakv"),
    "deltakv balanced PCA-only": needles(os.path.join(here, "needles_4k_balanced_pca.jsonl"), "deltakv"),
}
print_needles(runs, [("deltakv balanced PCA-only", "deltakv shipped (plain init, 650 steps)",
                      "balanced PCA-only against shipped")])
