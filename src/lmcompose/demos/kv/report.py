"""Reports of the key-value experiment: results.json, a Markdown table in the paper's layout, a bar chart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PAPER_TABLE_1 = {  # accuracy %, paper Table 1
    "m_A": {"KV-SUBS": 98.1, "NUM-MATH": 4.2, "KV-MATH": 0.7},
    "m_B": {"KV-SUBS": 0.0, "NUM-MATH": 73.7, "KV-MATH": 0.0},
    "CALM": {"KV-SUBS": 92.9, "NUM-MATH": 72.0, "KV-MATH": 84.3},
}
DATASETS = ("KV-SUBS", "NUM-MATH", "KV-MATH")


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: one row per model, one column per dataset, the paper's numbers alongside."""
    rows = results["rows"]
    lines = [
        f"# Key-value arithmetic (paper §4.1), preset `{results.get('preset', '?')}`",
        "",
        f"Exact match (greedy) on {results['eval_expressions']} expressions over held-out keys "
        f"({results['held_out_keys']} keys never in D_C; D_C uses {results['held_in_keys']} keys). "
        f"Task seed {results['config']['task']['seed']}, seed {results['config']['seed']}.",
        "",
    ]
    if results.get("key_blind_kv_math") is not None:
        lines += [f"A model that cannot tell keys apart can expect at most {results['key_blind_kv_math']:.1f}% "
                  "on KV-MATH (the likeliest answer of each operator pattern).", ""]
    lines += [
        "| model | " + " | ".join(DATASETS) + " | trainable params | paper (" + " / ".join(DATASETS) + ") |",
        "|---|" + "---|" * (len(DATASETS) + 2),
    ]
    for name, row in rows.items():
        paper = PAPER_TABLE_1.get(name)
        ref = " / ".join(f"{paper[d]:.1f}" for d in DATASETS) if paper else "-"
        params = f"{row['trainable_params']:,}" if "trainable_params" in row else "-"
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.1f}" for d in DATASETS) + f" | {params} | {ref} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()),
              f"Bases cached: {results['bases'].get('cached')}",
              f"CPU: {results.get('cpu', 'not recorded')}, kernels {results.get('cpu_capability', 'not recorded')} "
              "(torch's; the figures depend on both)", ""]
    return "\n".join(lines)


def bar_chart(results: dict[str, Any], path: Path) -> None:
    """A grouped bar chart (one group per model, one bar per dataset) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["rows"])
    width = 0.8 / len(DATASETS)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for k, d in enumerate(DATASETS):
        xs = [i + (k - (len(DATASETS) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [results["rows"][n][d] for n in names], width, label=d)
        ax.bar_label(bars, fmt="%.1f", fontsize=6.5, padding=1)
    if results.get("key_blind_kv_math") is not None:  # what guessing without the keys reaches on KV-MATH
        ax.axhline(results["key_blind_kv_math"], color="gray", linestyle="--", linewidth=0.8,
                   label="KV-MATH by guessing without the keys")
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
    ax.set_ylabel("exact match on held-out keys (%)")
    ax.set_ylim(0, 108)
    ax.set_title("Key-value arithmetic (CALM §4.1)", pad=24)
    # above the axes, so no bar is hidden behind it
    ax.legend(ncol=len(DATASETS) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], folder: Path) -> None:
    """results.json, results.md and results.png in ``folder`` (each written atomically)."""
    folder = Path(folder)
    for name, text in (("results.json", json.dumps(results, indent=2)), ("results.md", markdown(results))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)
    tmp = folder / ".results.tmp.png"
    bar_chart(results, tmp)
    os.replace(tmp, folder / "results.png")
