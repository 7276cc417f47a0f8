"""Reading/writing ``predictions.jsonl`` and turning predictions into ``summary.json`` / ``summary.md``.

Scores are in [0, 1] everywhere in the files; ``summary.md`` shows them as percentages.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

from .stats import score_interval


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


def scores_by_id(path, **match) -> dict:
    """``{prompt id: score}`` of the records of a ``predictions.jsonl`` whose fields equal ``match`` (e.g.
    ``method="omnikv", budget=0.25, length=4096``; a ``None`` value matches anything): what paired comparisons of two
    runs read."""
    return {r["id"]: r["score"] for r in read_predictions(Path(path))
            if all(v is None or r.get(k) == v for k, v in match.items())}


#: What ``benchmarks/accuracy_grid.sh``'s fixed lane folders add to their rows' method names (the others add nothing).
LANE_LABELS = {"scope_layer": "layer", "scope_kv_head": "kv_head", "omnikv_calibrated": "calibrated",
               "deltakv_calibrated": "calibrated", "deltakv_dcal": "calibrated for deltakv"}


def lane_label(folder: str) -> str:
    """The label an engine grid's lane folder gives its rows, so that two lanes of one method stay apart in a table:
    ``"scope_layer"`` -> ``"layer"``; a filter-layer set lane ``<method>[-<tag>]_L<layers>`` (the ``*_sets`` lanes;
    the tag names a compressor) -> ``"layers 0,1,2"`` or ``"<tag>, layers 0,1,2"``; ``<method>-<tag>`` with no layer
    set (``"omnikv-default-pool7"``) -> ``"<tag>"``; any other folder -> ``""`` (a plain method lane)."""
    head, sep, layers = folder.partition("_L")
    if sep and layers and all(part.isdigit() for part in layers.split("_")):
        tag = head.partition("-")[2]
        return (f"{tag}, " if tag else "") + "layers " + layers.replace("_", ",")
    if folder in LANE_LABELS:
        return LANE_LABELS[folder]
    return folder.partition("-")[2]


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


#: Per-sample fields of a prediction that the summary averages beside the score (see ``budget_use``).
USE_FIELDS = ("budget_tokens", "kept_tokens", "read_tokens", "full_layer_share")


def _cell(scores: list[float], recs: list[dict]) -> dict:
    """Score, sample count, 95% interval and the mean budget use of one group of predictions."""
    low, high, kind = score_interval(scores)
    row = {"num_samples": len(scores), "score": _mean(scores), "ci_low": low, "ci_high": high, "interval": kind}
    row.update({field: _mean(r.get(field) for r in recs) for field in USE_FIELDS})
    return row


def summarize(records: list[dict]) -> dict:
    """Mean score per method x budget x task x length (``results``), per depth for needles (``by_depth``),
    and per method x budget over every sample (``overall``; with as many samples per cell, the mean of the
    cells), each with its sample count, a 95% interval (Wilson for 0/1 scores) and the mean tokens kept and read
    per sparse layer, the budget in tokens and the share of layers that read everything."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    depth_cells: dict[tuple, list[dict]] = defaultdict(list)
    overall_cells: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        cells[(rec["method"], rec["budget"], rec["task"], rec["length"])].append(rec)
        overall_cells[(rec["method"], rec["budget"])].append(rec)
        if rec.get("depth") is not None:
            depth_cells[(rec["method"], rec["budget"], rec["task"], rec["length"], rec["depth"])].append(rec)

    def rows(groups, names):
        return [dict(zip(names, key), **_cell([r["score"] for r in recs], recs))
                for key, recs in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))]

    return {"results": rows(cells, ("method", "budget", "task", "length")),
            "by_depth": rows(depth_cells, ("method", "budget", "task", "length", "depth")),
            "overall": rows(overall_cells, ("method", "budget"))}


def _sort_key(key: tuple) -> tuple:
    from .grid import VALID_METHODS

    method = VALID_METHODS.index(key[0]) if key[0] in VALID_METHODS else len(VALID_METHODS)
    return (method, key[0]) + tuple(k for k in key[1:])


def _budget_label(method: str, budget: float) -> str:
    return "-" if method == "full" else f"{budget:g}"


def _num(value, fmt: str) -> str:
    return "-" if value is None or value != value else format(value, fmt)


def _row_cells(r: dict) -> str:
    """The shared columns: n, score, 95% interval, budget tokens, kept, read, share of full layers."""
    return (f"{r['num_samples']} | {100 * r['score']:.1f} | {100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f} | "
            f"{_num(r.get('budget_tokens'), '.0f')} | {_num(r.get('kept_tokens'), '.0f')} | "
            f"{_num(r.get('read_tokens'), '.0f')} | {_num(r.get('full_layer_share'), '.2f')} |")


_SHARED_HEAD = "n | score | 95% CI | budget tok | kept/layer | read/layer | full layers |"


def to_markdown(summary: dict) -> str:
    """Three tables (overall per method x budget, per task x length cell, per needle depth), each with the sample
    count, a 95% interval and the tokens kept and read per sparse layer beside the budget."""
    lines = ["# sparse-hf eval summary", "",
             "Scores are percentages (mean over samples); 95% CI: Wilson's interval for 0/1 scores, else the normal "
             "approximation of the mean. budget tok: the budget in tokens of the prompt; kept/layer and "
             "read/layer: tokens a sparse layer holds and its attention reads at the last decode step (mean over "
             "samples and sparse layers, from the cache); full layers: share of layers that read everything "
             "(filter layers).", "",
             "## Overall (every sample of the method x budget)", "", f"| method | budget | {_SHARED_HEAD}",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {_budget_label(r['method'], r['budget'])} | {_row_cells(r)}"
              for r in summary["overall"]]
    lines += ["", "## Per task and length", "", f"| method | budget | task | length | {_SHARED_HEAD}",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {_budget_label(r['method'], r['budget'])} | {r['task']} | {r['length']} | "
              f"{_row_cells(r)}" for r in summary["results"]]
    if summary.get("by_depth"):
        lines += ["", "## Needle tasks per depth", "", f"| method | budget | task | length | depth | {_SHARED_HEAD}",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {_budget_label(r['method'], r['budget'])} | {r['task']} | {r['length']} | "
                  f"{r['depth']:g} | {_row_cells(r)}" for r in summary["by_depth"]]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, output_dir: Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.md`` into ``output_dir``."""
    json_path, md_path = output_dir / "summary.json", output_dir / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(summary), encoding="utf-8")
    return json_path, md_path
