"""Plots of an eval summary with matplotlib's Agg backend (no display needed).

* ``accuracy_vs_budget.png``: one panel per task (plus the mean over tasks), score vs budget, one line per
  sparse method, the ``full`` baseline as a dashed horizontal line; scores are averaged over lengths. A panel
  of one length shades each method's 95% interval.
* ``needle_heatmap_<method>_b<budget>.png``: for needle tasks, one depth x length heatmap per task.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_budget(summary: dict, path: Path) -> Path:
    """Score vs budget per method, one panel per task and a 'mean over tasks' panel."""
    plt = _pyplot()
    per_task: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    intervals: dict[str, dict[tuple, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for row in summary["results"]:
        per_task[row["task"]][(row["method"], row["budget"])].append(row["score"])
        if "ci_low" in row:
            intervals[row["task"]][(row["method"], row["budget"])].append((row["ci_low"], row["ci_high"]))
    if len(per_task) > 1:  # macro average: each task counts once, whatever its lengths
        for cells in list(per_task.values()):
            for key, scores in cells.items():
                per_task["mean over tasks"][key].append(sum(scores) / len(scores))
    panels = list(per_task)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for ax, task in zip(axes.flat, panels):
        cells = {k: sum(v) / len(v) for k, v in per_task[task].items()}
        budgets = sorted({b for (m, b) in cells if m != "full"}) or [1.0]
        if ("full", 1.0) in cells:
            ax.axhline(100 * cells[("full", 1.0)], color="black", linestyle="--", label="full")
        for n, method in enumerate(dict.fromkeys(m for m, _ in cells if m != "full")):
            xs = [b for b in budgets if (method, b) in cells]
            # past ten methods the colours repeat: every method's marker and line style differ from the ten before
            turn = n // 10
            line, = ax.plot(xs, [100 * cells[(method, b)] for b in xs], marker="osD^v"[turn % 5],
                            linestyle=("-", "--", ":", "-.")[turn % 4], color=f"C{n % 10}", label=method)
            ci = [intervals[task].get((method, b), []) for b in xs]
            if ci and all(len(c) == 1 for c in ci):          # one length: the cell's own interval
                ax.fill_between(xs, [100 * c[0][0] for c in ci], [100 * c[0][1] for c in ci],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(task)
        ax.set_xlabel("KV budget (fraction of prompt)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    legend = {}                                   # label -> handle, over every panel (a panel may lack a method)
    for ax in list(axes.flat)[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if spare:          # an empty slot holds the legend, so that it covers no curve
        spare[0].legend(legend.values(), legend.keys(), fontsize=8, loc="upper left", frameon=False)
    elif len(legend) > 6:
        fig.legend(legend.values(), legend.keys(), fontsize=8, loc="outside right upper")
    else:
        axes.flat[0].legend(legend.values(), legend.keys(), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_needle_heatmaps(summary: dict, output_dir: Path) -> list[Path]:
    """One PNG per method x budget with a depth (rows) x length (columns) heatmap per needle task."""
    plt = _pyplot()
    groups: dict[tuple, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in summary.get("by_depth", []):
        groups[(row["method"], row["budget"])][row["task"]][(row["depth"], row["length"])] = row["score"]
    paths = []
    for (method, budget), tasks in groups.items():
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 1, 3.8), squeeze=False,
                                 layout="constrained")
        for ax, (task, cells) in zip(axes.flat, sorted(tasks.items())):
            depths = sorted({d for d, _ in cells})
            lengths = sorted({n for _, n in cells})
            grid = [[100 * cells.get((d, n), float("nan")) for n in lengths] for d in depths]
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    if not math.isnan(value):
                        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(task)
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="score (%)")
        label = "full" if method == "full" else f"{method} (budget {budget:g})"
        fig.suptitle(label)
        name = f"needle_heatmap_{method}.png" if method == "full" else f"needle_heatmap_{method}_b{budget:g}.png"
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        paths.append(output_dir / name)
    return paths


def make_plots(summary: dict, output_dir: Path) -> list[Path]:
    """All plots for ``summary`` into ``output_dir``; returns the written paths."""
    if not summary["results"]:
        return []
    try:
        _pyplot()
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'sparse-hf[eval]'): no plots written")
        return []
    return [plot_accuracy_vs_budget(summary, output_dir / "accuracy_vs_budget.png"),
            *plot_needle_heatmaps(summary, output_dir)]
