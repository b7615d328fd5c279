"""The facts demo's scale: both augments, the compositions, the baselines and the evaluation, in one config.

One line per field says what it is; why it has its value is in experiments/facts/LOG.md, cited by run number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional, Sequence

from .task import DC_WORDINGS, FactsTaskConfig, dc_templates


@dataclass
class FactsPipelineConfig:
    """Every scaling decision of the facts demo (the CPU preset)."""

    task: FactsTaskConfig = field(default_factory=FactsTaskConfig)  # the people, their cities, the split
    # same-tokenizer augment: SmolLM2's first blocks, its embeddings frozen, further trained on the facts
    same_blocks: int = 4
    same_trained_from: int = 0  # blocks below this stay as SmolLM2 has them
    same_steps: int = 800
    same_lr: float = 1e-3
    same_rows: int = 24  # packed rows per step
    same_length: int = 64  # tokens per row
    # character-level augment: a Llama trained from scratch on the facts' characters
    char_layers: int = 4
    char_hidden: int = 192
    char_heads: int = 6
    char_steps: int = 1500
    char_lr: float = 3e-3
    char_rows: int = 16
    char_length: int = 256  # characters per row
    char_varied: bool = True  # its texts have names in more contexts (task.VARIED_STATEMENTS, VARIED_RECORDS; run 12)
    char_lookahead: int = 4  # characters each position predicts (1: the next; more: multi-token prediction, run 19)
    # the compositions: (augment_layer, anchor_layer) pairs, per augment kind
    same_connections: list = field(default_factory=lambda: [[3, 18], [3, 22], [3, 26]])
    char_connections: list = field(default_factory=lambda: [[3, 18], [3, 22], [3, 26]])
    compose_heads: Optional[int] = None  # cross-attention heads; None: the anchor's 9
    null_attention: bool = True  # a connection can add nothing (beyond the paper)
    null_score: float = 4.0  # the null key's starting score over the average key's (runs 8, 9)
    compose_steps: int = 150
    char_compose_steps: Optional[int] = 300  # the character-level row's steps; None: compose_steps (run 13)
    compose_lr: float = 1e-3
    compose_batch: int = 16
    cache_anchor_states: bool = False  # replay SmolLM2's blocks 0-18 in the CALM rows (1.5x a step; LOG runs 27, 28)
    dc_wordings: list = field(default_factory=lambda: list(DC_WORDINGS))  # D_C's (task.dc_templates; LOG run 30)
    preserve_weight: float = 1.0  # KL from SmolLM2 on ordinary text, added to the loss (beyond the paper)
    preserve_ratio: float = 0.25  # preservation texts per D_C example
    preserve_length: int = 24  # tokens per preservation text (stdlib docstrings, never the evaluation's pydoc text)
    preserve_known: float = 0.2  # of the preservation texts, D_C-wording questions about people not in the task
    # baselines on D_C: LoRA with CALM's parameter count, and every weight of SmolLM2
    baseline_steps: int = 100
    lora_lr: float = 1e-3
    finetune_lr: float = 1e-5
    # evaluation
    eval_held_in: int = 50  # held-in people asked in every wording
    eval_held_out: int = 300  # held-out people asked in every wording
    ordinary_tokens: int = 20480  # tokens of pydoc_data.topics for the loss and KL columns
    skill_items: Optional[int] = None  # few-shot sums scored (None: all 81 pairs of 1..9)
    cpu_kernels: Optional[str] = "avx2"  # the CPU vector instructions of every job (see job_environment; run 25)
    threads: int = 1  # torch threads per process
    workers: int = 2  # processes training side by side
    seed: int = 0  # seed of every model and data stream (the task has its own seed)

    def __post_init__(self) -> None:
        dc_templates(self.dc_wordings)  # an unknown wording is refused here, not in a worker later

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def fingerprint(self, *names: str) -> str:
        """A short hash of the task, the seed, the CPU kernels and the named fields (the cache key of what they
        decide)."""
        d = self.to_dict()
        keep = {"task": d["task"], "seed": d["seed"], "cpu_kernels": d["cpu_kernels"], **{n: d[n] for n in names}}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def preset(seed: int = 0, **changes: Any) -> FactsPipelineConfig:
    """The demo's preset for ``seed`` (the task's and every model's, as ``--seed`` sets them), with ``changes``."""
    return FactsPipelineConfig(task=FactsTaskConfig(seed=seed), seed=seed, **changes)


def with_settings(config: FactsPipelineConfig, settings: Sequence[str]) -> FactsPipelineConfig:
    """A copy of ``config`` with each ``NAME=JSON`` setting applied (``task.NAME`` for a FactsTaskConfig field), e.g.
    ``preserve_weight=2.0`` or ``task.held_in_fraction=0.4``; an unknown name or a value that is not JSON is refused."""
    top, task = {}, {}
    for setting in settings:
        name, sep, value = setting.partition("=")
        target, cls = (task, FactsTaskConfig) if name.startswith("task.") else (top, FactsPipelineConfig)
        key = name.removeprefix("task.")
        if not sep or key not in {f.name for f in fields(cls)} or key == "task":
            raise ValueError(f"setting {setting!r}: expected NAME=JSON with NAME a field of {cls.__name__} "
                             f"(task.NAME for FactsTaskConfig's)")
        try:
            target[key] = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"setting {setting!r}: the value is not JSON ({err.msg}); quote strings, e.g. "
                             f'{key}="text"') from None
    return replace(config, task=replace(config.task, **task), **top)


AUGMENT_FIELDS = {
    "same": ("same_blocks", "same_trained_from", "same_steps", "same_lr", "same_rows", "same_length"),
    "char": ("char_layers", "char_hidden", "char_heads", "char_steps", "char_lr", "char_rows", "char_length",
             "char_varied", "char_lookahead"),
}
# The settings of each augment kind, its connections included; and the augments each trained row is built on. A
# row's cache key hashes every setting but the scoring's and the process layout's, less those of the augments
# it is not built on: changing one augment retrains it and its rows only, and a new setting counts for every row
# until it is known not to. The random augment has the same-tokenizer augment's architecture; LoRA's rank matches
# that composition's parameter count.
COMPOSE_FIELDS = {"same": ("same_connections",), "char": ("char_connections", "char_compose_steps")}
KIND_FIELDS = {kind: (*fields, *COMPOSE_FIELDS[kind]) for kind, fields in AUGMENT_FIELDS.items()}
ROW_AUGMENTS = {"CALM (same tokenizer)": ("same",), "CALM (characters)": ("char",),
                "CALM (random augment)": ("same",), "LoRA on SmolLM2": ("same",), "SmolLM2 fine-tuned on D_C": ()}
RUN_FIELDS = ("ordinary_tokens", "skill_items", "threads", "workers")  # how the demo scores and runs, not training
# Settings added after caches of the demo exist, and the value every one of those was trained with: at that value
# a setting keys nothing, so the caches stay valid.
LATER_FIELDS = {"dc_wordings": list(DC_WORDINGS)}


CPU_KERNELS = ("avx2", "avx512")


def job_environment(config: FactsPipelineConfig) -> dict[str, str]:
    """The environment every job of the demo starts with (in a worker process): torch's and MKL's CPU kernels held
    to ``config.cpu_kernels``'s vector instructions, so that machines with more of them (AVX-512) compute the same
    floats as those with just these (AVX2), and train the same models; ``{}`` (the machine's own) for None.

    ``ATEN_CPU_CAPABILITY`` picks torch's own kernels (on a CPU without those instructions torch keeps its own;
    torch.backends.cpu.get_cpu_capability() says which a process uses), ``MKL_CBWR`` MKL's matrix products.
    """
    if config.cpu_kernels is None:
        return {}
    if config.cpu_kernels not in CPU_KERNELS:
        raise ValueError(f"cpu_kernels={config.cpu_kernels!r} is not a set of CPU vector instructions torch and MKL "
                         f"can be held to; use one of {CPU_KERNELS}, or None for the machine's own")
    return {"ATEN_CPU_CAPABILITY": config.cpu_kernels, "MKL_CBWR": config.cpu_kernels.upper()}


def compose_steps(config: FactsPipelineConfig, row: str) -> int:
    """The composition steps of the CALM row ``row``."""
    if "char" in ROW_AUGMENTS[row] and config.char_compose_steps is not None:
        return config.char_compose_steps
    return config.compose_steps


def row_fields(config: FactsPipelineConfig, row: str) -> tuple[str, ...]:
    """The settings that key ``row``'s cache (see ROW_AUGMENTS)."""
    others = {f for kind, fields in KIND_FIELDS.items() if kind not in ROW_AUGMENTS[row] for f in fields}
    d = config.to_dict()
    return tuple(f for f in d if f not in ("task", "seed", "cpu_kernels") and not f.startswith("eval_")
                 and f not in RUN_FIELDS and f not in others and not (f in LATER_FIELDS and d[f] == LATER_FIELDS[f]))
