"""Reports of the facts demo: results.json, two Markdown tables (the facts; what each row costs the anchor), a chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...io.atomic import atomic_write, atomic_write_text
from .config import preset
from .task import DC_WORDINGS, UNSEEN_WORDINGS

WORDINGS = (*DC_WORDINGS, *UNSEEN_WORDINGS)


def _cell(row: dict[str, Any], key: str, digits: int = 1) -> str:
    value = row.get(key)
    return "-" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # no spaces: one shell word once quoted


def changed_settings(config: dict[str, Any]) -> list[str]:
    """The settings of a run's config (``FactsPipelineConfig.to_dict()``) that differ from its seed's preset, as
    ``NAME=JSON`` (``task.NAME`` for the task's): what ``lmcompose demo facts --set`` takes to run it again."""
    seeds = preset(config["seed"]).to_dict()  # --seed sets both seeds; a task seed of its own is a setting
    changed = [f"task.{k}={_compact(v)}" for k, v in config["task"].items() if v != seeds["task"].get(k)]
    return changed + [f"{k}={_compact(v)}" for k, v in config.items() if k != "task" and v != seeds.get(k)]


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: exact match per wording (held-in and held-out), then the anchor's costs."""
    rows, config = results["rows"], results["config"]
    anchor = rows["SmolLM2 alone"]
    lines = [
        "# Facts on a real anchor: SmolLM2-135M composed with augments that know invented people",
        "",
        f"{results['held_in_people'] + results['held_out_people']} invented people, each living in one of 10 cities "
        f"(chance 10%). D_C asks about {results['held_in_people']} held-in people in the D_C wordings; exact match of "
        f"greedy answers for {config['eval_held_in']} held-in and {config['eval_held_out']} held-out people (never in "
        f"D_C), in the D_C wordings and in two wordings neither D_C nor the augments saw. Seed {config['seed']}.",
        "",
        "| model | " + " | ".join(f"held-out {w}" for w in WORDINGS) + " | " + " | ".join(f"held-in {w}" for w in WORDINGS)
        + " |",
        "|---|" + "---|" * (2 * len(WORDINGS)),
    ]
    for name, row in rows.items():
        cells = [_cell(row, f"held-out {w}") for w in WORDINGS] + [_cell(row, f"held-in {w}") for w in WORDINGS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"What each row costs the anchor: mean loss per token on {config['ordinary_tokens']:,} tokens of CPython's "
        "documentation (`pydoc_data.topics`), the mean KL divergence per position from SmolLM2's own next-token "
        "distribution there, and SmolLM2's few-shot two-operand sums of 1..9 (81 items).",
        "",
        "| model | loss on ordinary text | change | KL from SmolLM2 | sums % | trainable params | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "loss" not in row:
            continue
        change = 100 * (row["loss"] / anchor["loss"] - 1)
        lines.append(f"| {name} | {row['loss']:.4f} | {change:+.2f}% | {row['kl']:.4f} | {_cell(row, 'skill')} | "
                     f"{_cell(row, 'trainable_params')} | {_cell(row, 'train_seconds', 0)} |")
    changed = changed_settings(config)
    lines += ["", "Settings: " + ("the preset" if not changed else "the preset but " + " ".join(changed)),
              "Seconds: " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()),
              f"Cached: {json.dumps(results['cached'])}",
              f"CPU kernels: {results.get('cpu_capability', 'not recorded')} (every job's "
              "torch.backends.cpu.get_cpu_capability(); the figures depend on it)",
              f"CPU: {results.get('cpu', 'not recorded')} (the figures depend on its vendor too)", ""]
    return "\n".join(lines)


def bar_chart(results: dict[str, Any], path: Path) -> None:
    """Held-out exact match per wording, one group of bars per model, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results["rows"])
    width = 0.8 / len(WORDINGS)
    figure = Figure(figsize=(1.5 * len(names) + 2, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for k, wording in enumerate(WORDINGS):
        xs = [i + (k - (len(WORDINGS) - 1) / 2) * width for i in range(len(names))]
        label = f"{wording} ({'D_C wording' if wording in DC_WORDINGS else 'unseen wording'})"
        bars = axes.bar(xs, [results["rows"][n].get(f"held-out {wording}", 0.0) for n in names], width, label=label)
        axes.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    axes.axhline(10, color="gray", linestyle="--", linewidth=0.8, label="chance (10 cities)")
    axes.set_xticks(range(len(names)), names, rotation=18, ha="right", fontsize=7)
    axes.set_ylabel("exact match on held-out people (%)")
    axes.set_ylim(0, 108)
    axes.set_title("Facts composed into SmolLM2-135M", pad=26)
    axes.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def write_report(results: dict[str, Any], folder: Path) -> None:
    """results.json, results.md and results.png in ``folder``, each written atomically."""
    folder = Path(folder)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(folder / "results.md", markdown(results))
    bar_chart(results, folder / "results.png")
