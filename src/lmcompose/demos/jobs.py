"""Jobs of a demo run side by side in worker processes (each job is an importable function of plain arguments)."""

from __future__ import annotations

from typing import Callable


def _quiet_worker() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # in a worker the jobs' own progress lines are what the user follows


def run_jobs(fn: Callable, jobs: list[tuple], workers: int) -> list:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes when more than one (``fn`` must be importable)."""
    if workers <= 1:
        return [fn(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in OpenMP
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker) as pool:
        return list(pool.map(fn, *zip(*jobs)))
