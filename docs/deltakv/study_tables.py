"""Shared readers and printers of the DeltaKV/OmniKV study folders' tables (imported by their ``table.py`` and
``needles_table.py``): teacher-forced answer NLL (``benchmarks/deltakv_answer_nll.py --json`` files) and greedy
needles at 4K (``predictions.jsonl`` of the CPU engine), with the paired tests of :mod:`sparse_hf.eval.stats`."""
import json
import os

from sparse_hf.eval.report import scores_by_id
from sparse_hf.eval.stats import paired_comparison

HERE = os.path.dirname(os.path.abspath(__file__))
ACCURACY = os.path.join(HERE, "..", "accuracy")
#: The 60 needle prompts at 4K: the full cache (H200 grid), OmniKV and the shipped compressor with [0,1,2,3,8,17,22].
FULL_4K = os.path.join(ACCURACY, "smollm2_h200_engine_2026-12-03", "base", "predictions.jsonl")
L17_4K = os.path.join(ACCURACY, "omnikv_text_recall_2026-12-03", "l17_4k")


def answer_nll_rows(paths) -> dict:
    """``{config: {prompt id: row}}`` of the answer-NLL json files that exist among ``paths``."""
    rows = {}
    for path in paths:
        if os.path.exists(path):
            for r in json.load(open(path))["rows"]:
                rows.setdefault(r["config"], {})[r["id"]] = r
    return rows


def print_answer_nll(rows: dict, ids: list, cols: list, pairs, bullet: str = "") -> None:
    """The per-prompt NLL table of ``cols``, each column's mean, and a sign test per ``(a, b)`` of ``pairs``."""
    print("| prompt | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for i in ids:
        print(f"| {i} | " + " | ".join(f"{rows[c][i]['nll']:.3f}" if i in rows.get(c, {}) else "-" for c in cols)
              + " |")
    if bullet:
        print()
    for c in cols:
        got = [rows[c][i] for i in ids if i in rows.get(c, {})]
        if got:
            print(f"{bullet}{c}: mean NLL {sum(r['nll'] for r in got) / len(got):.3f} over {len(got)}, answer all "
                  f"argmax {sum(r['all_argmax'] for r in got)}/{len(got)}")
    if bullet:
        print()
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        diff = [rows[a][i]["nll"] - rows[b][i]["nll"] for i in ids]
        better, _, p = paired_comparison({i: rows[a][i]["nll"] for i in ids}, {i: rows[b][i]["nll"] for i in ids},
                                         ids, lower_is_better=True)
        print(f"{bullet}{a} - {b}: mean {sum(diff) / len(diff):+.3f} nats/token, lower on {better} of {len(diff)} "
              f"prompts (sign test p = {p:.2g})")


def needles(path: str, method: str, budget=None) -> dict:
    """``{prompt id: score}`` of ``method`` at 4K (and ``budget``) in a predictions file."""
    return scores_by_id(path, length=4096, method=method, budget=budget)


def print_needles(runs: dict, pairs, bullet: str = "") -> None:
    """The needle counts of each run on the prompts all of them hold, then (after a blank line) McNemar per
    ``(a, b)`` of ``pairs`` (printed as ``"{bullet}{a} against {b}"``; a pair may be ``(a, b, label)``)."""
    ids = sorted(set.intersection(*(set(r) for r in runs.values())))
    print(f"| cache ({len(ids)} prompts at 4K, 0.25) | niah_single | niah_multikey | all |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        cells = [sum(r[i] for i in ids if i.startswith(t)) for t in ("niah_single", "niah_multikey")]
        print(f"| {name} | {cells[0]:.0f} | {cells[1]:.0f} | {sum(cells):.0f} |")
    print()
    for pair in pairs:
        a, b = pair[:2]
        wins, losses, p = paired_comparison(runs[a], runs[b], ids)
        label = pair[2] if len(pair) > 2 else f"{a} against {b}"
        print(f"{bullet}{label}: {wins} vs {losses} discordant, McNemar p = {p:.2g}")
