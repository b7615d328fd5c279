"""The key-value experiment's scale: every model size, step count and learning rate, and the two presets.

One line per field says what it is; why it has its value is in experiments/kv/LOG.md, cited by run number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from .task import KVTaskConfig, paper_task


@dataclass
class KVPipelineConfig:
    """Every scaling decision of the experiment. Defaults: the CPU "quick" preset."""

    task: KVTaskConfig = field(default_factory=KVTaskConfig)  # keys, values, expressions, split
    anchor_layers: int = 4  # m_B: 4 blocks x 128, knows NUM-MATH, never sees a key
    anchor_hidden: int = 128
    anchor_heads: int = 4
    anchor_steps: int = 8000  # NUM-MATH 93.7-98.1% after 8000 steps, 78-85% after 4000 (LOG.md runs 55, 58)
    anchor_lr: float = 1e-3  # 2e-3 was no faster (run 58a)
    anchor_unknown_keys: bool = True  # every key reads as the anchor's <unk> embedding (runs 24-26)
    anchor_embedding_noise: float = 1.0  # Gaussian noise x RMS on m_B's input embeddings in training (runs 41, 47-49, 55)
    augment_layers: int = 2  # m_A: 2 blocks x 96, memorises KV-SUBS over every key
    augment_hidden: int = 96
    augment_heads: int = 4
    augment_steps: int = 3000  # far past 100% KV-SUBS (400 steps): cleaner key states (run 54)
    augment_lr: float = 2e-3
    batch_size: int = 64  # examples per step, every training run
    # CALM's (augment_layer, anchor_layer) pairs; -1 is the anchor's embeddings (runs 26a, 41b, 46d, 46j)
    connections: list = field(default_factory=lambda: [[1, -1], [0, -1], [0, 0], [1, 1]])
    rotary: bool = True  # rotary positions in the cross-attention (beyond the paper)
    compose_heads: Optional[int] = 32  # cross-attention heads; None: the anchor's (runs 13, 15, 16)
    compose_steps: int = 1500  # CALM and its random-m_A control; the 5-minute cached budget (runs 54, 58)
    baseline_steps: Optional[int] = 750  # LoRA and fine-tuning on D_C; None: compose_steps (run 42)
    compose_lr: float = 3e-3  # 6e-3 collapsed NUM-MATH (run 20)
    num_math_mix: float = 0.3  # fraction of NUM-MATH in D_C, which keeps the anchor's arithmetic
    lora_lr: float = 3e-3  # LoRA on m_B, rank matched to CALM's parameter count (paper Table 5)
    finetune_lr: float = 3e-4  # full fine-tuning of m_B on D_C
    threads: int = 1  # torch threads per process (tiny models: one thread per core is fastest)
    workers: int = 0  # processes training rows side by side; 0: cores // threads (one when threads is 0)
    seed: int = 0  # seed of model initialisation and data streams (the task has its own seed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def base_fingerprint(self) -> str:
        """A short hash of everything the two base models depend on (their cache key)."""
        d = self.to_dict()
        keep = {k: v for k, v in d.items() if k.startswith(("anchor_", "augment_")) or k in ("task", "batch_size", "seed")}
        keep["task"] = {k: v for k, v in keep["task"].items() if k != "num_eval"}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def quick_config(seed: int = 0) -> KVPipelineConfig:
    """The CPU preset: 400 one-token keys, values 1..19, 2-3 operands."""
    return KVPipelineConfig(task=KVTaskConfig(seed=seed), seed=seed)


def paper_config(seed: int = 0) -> KVPipelineConfig:
    """The paper's scale (25K keys, 3-6 operands, + - x), for a GPU. Sizes are a guess, never run here."""
    return KVPipelineConfig(
        task=paper_task(seed), anchor_layers=12, anchor_hidden=512, anchor_heads=8, anchor_steps=50_000,
        anchor_lr=5e-4, augment_layers=8, augment_hidden=256, augment_heads=4, augment_steps=30_000,
        augment_lr=1e-3, batch_size=256, connections=[[1, 0], [3, 3], [5, 6], [7, 9]],
        compose_steps=20_000, compose_lr=1e-3, threads=0, seed=seed,
    )


PRESETS: dict[str, Callable[[int], KVPipelineConfig]] = {"quick": quick_config, "paper": paper_config}
