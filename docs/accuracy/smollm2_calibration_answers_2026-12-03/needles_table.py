"""Greedy needles at 4K, budget 0.25 (CPU engine, SmolLM2-135M): OmniKV with the filter layers that
``calibrate --append-answers`` chose (``needles_4k_omnikv_ans.jsonl``, this folder) against the hand-found
``[0,1,2,3,8,17,22]`` (../omnikv_text_recall_2026-12-03/l17_4k/) and the full cache (the H200 grid of 2026-12-03),
on the same 60 prompts. Usage: python3 needles_table.py [this folder]"""
import os
import sys

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "deltakv"))
from study_tables import FULL_4K, L17_4K, needles, print_needles  # noqa: E402

HAND, ANS = "omnikv [0,1,2,3,8,17,22] (hand-found)", "omnikv [0,3,12,17,21,27,28] (calibrate --append-answers)"
runs = {
    "full": needles(FULL_4K, "full"),
    HAND: needles(os.path.join(L17_4K, "omnikv_0.25.jsonl"), "omnikv", 0.25),
    ANS: needles(os.path.join(here, "needles_4k_omnikv_ans.jsonl"), "omnikv", 0.25),
}
print_needles(runs, [(ANS, HAND), (ANS, "full")])
