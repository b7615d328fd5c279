"""Helpers shared by the benchmark scripts: timing, medians, machine description, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def machine() -> str:
    """A one-line description of where the benchmark ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (synchronising CUDA when present)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per case, running the cases in turn (A, B, C, A, B, C, ...) so noise hits all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(times) for name, times in samples.items()}


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


class TensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the context and alive at the same time.

    Deterministic, unlike the process's resident size (allocator caching, page reuse): every storage an
    operator returns is counted from its creation until it is freed. Storages that existed before the
    context (weights, optimiser state) are not counted. (torch's own ``MemTracker`` cannot be used: it
    hooks every parameter's gradient and fails on frozen ones.)
    """

    def __enter__(self) -> "TensorMemory":
        self.live, self.peak, self._seen = 0, 0, weakref.WeakSet()
        return super().__enter__()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                # an output aliasing an input (a view, an in-place update of a weight) is no new memory
                if storage.nbytes() and storage.data_ptr() not in inputs and storage not in self._seen:
                    self._seen.add(storage)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out
