"""Plot of ``sparse-hf bench`` results: decode tokens/s per method, one group of bars per case."""

from __future__ import annotations


def plot_bench(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "decode_tok_s" in r]
    cases = sorted({(r["L"], r["B"]) for r in ok})
    labels = []
    for r in ok:
        label = r["method"] if r.get("budget") is None else f"{r['method']}@{r['budget']:g}"
        if label not in labels:
            labels.append(label)
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(4.5 * max(1, len(cases)), 4), squeeze=False)
    for ax, (length, batch) in zip(axes[0], cases):
        values = []
        for label in labels:
            match = [r["decode_tok_s"] for r in ok if r["L"] == length and r["B"] == batch and
                     (r["method"] if r.get("budget") is None else f"{r['method']}@{r['budget']:g}") == label]
            values.append(match[0] if match else 0.0)
        colors = ["#888888" if label in ("vanilla", "hf-best") else "#2a7ab9" for label in labels]
        ax.barh(range(len(labels)), values, color=colors)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s")
        ax.set_title(f"prompt {length} x batch {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
