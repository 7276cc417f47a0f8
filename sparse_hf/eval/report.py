"""Reading/writing ``predictions.jsonl`` and turning predictions into ``summary.json`` / ``summary.md``.

Scores are in [0, 1] everywhere in the files; ``summary.md`` shows them as percentages.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path


def record_key(rec: dict) -> tuple:
    """What identifies one prediction: method, budget, task, length, depth and sample id."""
    depth = rec.get("depth")
    return (rec["method"], float(rec["budget"]), rec["task"], int(rec["length"]),
            None if depth is None else float(depth), rec["id"])


def read_predictions(path: Path) -> list[dict]:
    """Every complete record of ``path`` (a truncated last line, e.g. after a crash, is skipped)."""
    records: list[dict] = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: skipping an unreadable line (interrupted write?)")
    return records


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(records: list[dict]) -> dict:
    """Mean score per method x budget x task x length (``results``), per depth for needles (``by_depth``),
    and per method x budget as the mean over the task x length cells (``overall``)."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    depth_cells: dict[tuple, list[float]] = defaultdict(list)
    for rec in records:
        cells[(rec["method"], rec["budget"], rec["task"], rec["length"])].append(rec["score"])
        if rec.get("depth") is not None:
            depth_cells[(rec["method"], rec["budget"], rec["task"], rec["length"], rec["depth"])].append(rec["score"])
    results = [{"method": m, "budget": b, "task": t, "length": n, "num_samples": len(s), "score": _mean(s)}
               for (m, b, t, n), s in sorted(cells.items(), key=lambda kv: _sort_key(kv[0]))]
    by_depth = [{"method": m, "budget": b, "task": t, "length": n, "depth": d, "num_samples": len(s),
                 "score": _mean(s)} for (m, b, t, n, d), s in sorted(depth_cells.items(), key=lambda kv: _sort_key(kv[0]))]
    overall_cells: dict[tuple, list[float]] = defaultdict(list)
    for row in results:
        overall_cells[(row["method"], row["budget"])].append(row["score"])
    overall = [{"method": m, "budget": b, "score": _mean(s)}
               for (m, b), s in sorted(overall_cells.items(), key=lambda kv: _sort_key(kv[0]))]
    return {"results": results, "by_depth": by_depth, "overall": overall}


def _sort_key(key: tuple) -> tuple:
    from .grid import VALID_METHODS

    method = VALID_METHODS.index(key[0]) if key[0] in VALID_METHODS else len(VALID_METHODS)
    return (method, key[0]) + tuple(k for k in key[1:])


def _budget_label(method: str, budget: float) -> str:
    return "-" if method == "full" else f"{budget:g}"


def to_markdown(summary: dict) -> str:
    """Two tables: the overall score per method x budget, then every method x budget x task x length cell."""
    lines = ["# sparse-hf eval summary", "", "Scores are percentages (mean over samples).", "",
             "## Overall (mean over task x length cells)", "", "| method | budget | score |", "|---|---|---|"]
    lines += [f"| {r['method']} | {_budget_label(r['method'], r['budget'])} | {100 * r['score']:.1f} |"
              for r in summary["overall"]]
    lines += ["", "## Per task and length", "", "| method | budget | task | length | n | score |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {_budget_label(r['method'], r['budget'])} | {r['task']} | {r['length']} | "
              f"{r['num_samples']} | {100 * r['score']:.1f} |" for r in summary["results"]]
    if summary.get("by_depth"):
        lines += ["", "## Needle tasks per depth", "", "| method | budget | task | length | depth | n | score |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {_budget_label(r['method'], r['budget'])} | {r['task']} | {r['length']} | "
                  f"{r['depth']:g} | {r['num_samples']} | {100 * r['score']:.1f} |" for r in summary["by_depth"]]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, output_dir: Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.md`` into ``output_dir``."""
    json_path, md_path = output_dir / "summary.json", output_dir / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(summary), encoding="utf-8")
    return json_path, md_path
