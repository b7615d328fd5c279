"""The facts demo end to end: SmolLM2-135M composed with augments that know invented people, every row scored.

An output directory holds ``demo.json`` (which demo it belongs to), ``anchor/`` (SmolLM2 saved from its GGUF once),
``augments/<fingerprint>/<kind>/`` (each trained augment under the hash of the settings it was trained with),
``rows/<fingerprint>/<row>/`` (each trained row under the hash of what its training reads, with ``done.json`` when it
finished) and the report (results.json, results.md, results.png). A second run, or one after an interruption, or
one with other settings, reuses every augment and row whose settings did not change.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..jobs import cpu_capability, cpu_model, run_jobs
from ..output import demo_output
from .config import AUGMENT_FIELDS, FactsPipelineConfig, job_environment, preset, row_fields
from .rows import TRAINED_ROWS, row_folder_name, save_anchor, train_augment_job, train_row_job
from .task import FactsTask

DEMO = "facts"


def prepare(config: FactsPipelineConfig, out: Path, log: Optional[Callable[[str], None]]) -> dict[str, Any]:
    """The anchor, the augments and every trained row, each made unless a finished one is on disk.

    Returns:
        {"folders": {"anchor": folder, "augments": {kind: folder}, "rows": {row: folder}}, "seconds": {...},
        "cached": {...}, "rows": {row: its done.json}}.
    """
    anchor_dir = out / "anchor"
    environment = job_environment(config)
    seconds: dict[str, float] = {}
    started = time.time()
    if not anchor_dir.is_dir():
        save_anchor(anchor_dir)
        seconds["anchor (from GGUF)"] = round(time.time() - started, 1)
    augments = {kind: out / "augments" / config.fingerprint(*AUGMENT_FIELDS[kind]) for kind in ("same", "char")}
    missing = [kind for kind in augments if not (augments[kind] / kind / "config.json").is_file()]
    if missing:
        started = time.time()
        jobs = [(kind, config, str(anchor_dir), str(augments[kind]), log is not None) for kind in missing]
        for kind, taken in zip(missing, run_jobs(train_augment_job, jobs, min(len(jobs), config.workers),
                                                   environment)):
            seconds[f"augment {kind}"] = round(taken, 1)
        seconds["augments (wall)"] = round(time.time() - started, 1)
    rows_dirs = {row: out / "rows" / config.fingerprint(*row_fields(config, row)) / row_folder_name(row)
                 for row in TRAINED_ROWS}
    todo = [row for row in TRAINED_ROWS if not (rows_dirs[row] / "done.json").is_file()]
    if todo:
        started = time.time()
        augment_dirs = {kind: str(folder) for kind, folder in augments.items()}
        jobs = [(row, config, str(anchor_dir), augment_dirs, str(rows_dirs[row]), log is not None) for row in todo]
        run_jobs(train_row_job, jobs, min(len(jobs), config.workers), environment)
        seconds["rows (wall)"] = round(time.time() - started, 1)
    rows = {row: json.loads((rows_dirs[row] / "done.json").read_text()) for row in TRAINED_ROWS}
    return {"folders": {"anchor": anchor_dir, "augments": augments, "rows": rows_dirs}, "seconds": seconds,
            "cached": {"augments": not missing, "rows": not todo}, "rows": rows}


def run_demo(output_dir: str, progress: bool = True, config: Optional[FactsPipelineConfig] = None,
             seed: int = 0) -> dict[str, Any]:
    """Run the facts demo and write results.json, results.md and results.png into ``output_dir``.

    Args:
        output_dir: where the results and every cache go.
        progress: print progress lines.
        config: overrides the preset (and ``seed``).
        seed: the seed of the people, their cities, the split, and every model and data stream.
    Returns:
        the results dict (also in results.json).
    """
    from .report import write_report
    from .scoring import score_rows

    if config is None:
        config = preset(seed)
    with demo_output(Path(output_dir), DEMO) as out:
        log = print if progress else None
        started = time.time()
        prepared = prepare(config, out, log)
        scoring_started = time.time()
        rows = score_rows(config, prepared, progress)
        seconds = {**prepared["seconds"], "scoring": round(time.time() - scoring_started, 1),
                   "total": round(time.time() - started, 1)}
        task = FactsTask(config.task)
        capability = run_jobs(cpu_capability, [()], 1, job_environment(config))[0]  # what the jobs computed with
        results = {"demo": DEMO, "config": config.to_dict(), "cpu": cpu_model(), "cpu_capability": capability,
                   "rows": rows, "seconds": seconds,
                   "cached": prepared["cached"], "held_in_people": len(task.held_in), "held_out_people": len(task.held_out)}
        write_report(results, out)
    return results
