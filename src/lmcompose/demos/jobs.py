"""Jobs of a demo run side by side in worker processes (each job is an importable function of plain arguments)."""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


def _quiet_worker() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # in a worker the jobs' own progress lines are what the user follows


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, as it was again after: what a process started inside inherits."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_jobs(fn: Callable, jobs: list[tuple], workers: int, environment: Optional[dict[str, str]] = None) -> list:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes when more than one (``fn`` must be importable).

    Args:
        environment: variables the worker processes start with (read by libraries as they load, such as
            ``ATEN_CPU_CAPABILITY``, too late to change in this process): given, the jobs always run in workers,
            at least one; this process's own environment is left as it was.
    """
    if workers <= 1 and not environment:
        return [fn(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in OpenMP
    with _environment(environment or {}), ProcessPoolExecutor(
            max(1, workers), mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [future.result() for future in futures]


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use in this process (``torch.backends.cpu``): AVX2, AVX512, ..."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor and model as the system names them ("GenuineIntel, Intel(R) Xeon(R) ..."; Linux's
    ``cpuinfo``, else the platform's processor string): under the same kernels, CPUs of two vendors still compute
    other floats in MKL's matrix products (experiments/facts/LOG.md run 30), so a demo records it."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    named = [fields[k] for k in ("vendor_id", "model name") if fields.get(k)]
    return ", ".join(named) or platform.processor() or platform.machine() or "unknown"
