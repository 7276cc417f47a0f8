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


def markdown_table(results: list[dict]) -> str:
    """One markdown row per result: the numbers ``sparse-hf bench`` measured, with ratios to the baselines."""
    head = ("| method | budget | prompt x batch | TTFT s | decode tok/s | step ms | roofline step ms | fraction of "
            "roofline | x vanilla | x hf-best | KV bytes vs full | peak extra GiB |")
    rows = [head, "|" + "---|" * 12]
    for r in results:
        case = f"{r['L']} x {r['B']}"
        if "error" in r:
            rows.append(f"| {r['method']} | {r.get('budget') or ''} | {case} | {r['error']} |" + " |" * 8)
            continue
        rows.append(
            f"| {r['method']} | {'' if r.get('budget') is None else r['budget']} | {case} | {r['ttft_s']:.2f} | "
            f"{r['decode_tok_s']:.1f} | {r['decode_step_ms']:.1f} | {r.get('roofline_step_ms', '')} | "
            f"{r.get('frac_of_roofline', '')} | {r.get('decode_x_vanilla', '')} | {r.get('decode_x_hf-best', '')} | "
            f"{r.get('kv_ratio', '')} | {r.get('peak_extra_gib', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":   # python -m sparse_hf.bench_report bench.json [...]: print the markdown table
    import json
    import sys

    for path in sys.argv[1:]:
        data = json.load(open(path))
        print(f"\n{path}: {data['env']}\n")
        print(markdown_table(data["results"]))
