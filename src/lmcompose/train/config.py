"""TrainingConfig: every setting of a training run (dataclass, JSON and YAML round trip).

Each field declares, in one place, its default, its help (what ``lmcompose train --help`` prints), the command-line
flag that sets it (when there is one), the check its value must pass, and whether it decides the trajectory of
the weights (a resumed run must agree with its checkpoint on it). The CLI builds its training flags from these.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

from ..core.fields import DictConfig, check_value, config_field
from ..io.safe_files import parse_json, parse_yaml, read_text

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("no", "bf16")
SHARDINGS = ("none", "fsdp2", "zero3")

@dataclass
class TrainingConfig(DictConfig):
    """How the composition is trained. Only the connections learn; the base models stay frozen."""

    seed: int = config_field(0, "seed of the data order (one permutation per epoch) and of every RNG", "seed",
                       flag="seed", trajectory=True)
    learning_rate: float = config_field(3e-4, "peak AdamW learning rate, reached after warmup", "positive_number",
                                  flag="lr", trajectory=True)
    weight_decay: float = config_field(0.0, "AdamW decoupled weight decay", "non_negative_number", flag="weight_decay",
                                 trajectory=True)
    adam_beta1: float = config_field(0.9, "AdamW beta1", "beta", trajectory=True)
    adam_beta2: float = config_field(0.999, "AdamW beta2", "beta", trajectory=True)
    adam_epsilon: float = config_field(1e-8, "AdamW epsilon", "positive_number", trajectory=True)
    batch_size: int = config_field(8, "examples per micro-batch (per process)", "positive", flag="batch_size",
                             trajectory=True, metavar="N")
    gradient_accumulation_steps: int = config_field(1, "micro-batches per optimiser step", "positive", flag="grad_accum",
                                              trajectory=True, metavar="N")
    max_steps: Optional[int] = config_field(None, "optimiser steps to run (default: one epoch)", "positive",
                                      flag="max_steps", trajectory=True, optional=True, metavar="N")
    epochs: Optional[int] = config_field(None, "passes over the data when max_steps is not given (default: 1)", "positive",
                                   flag="epochs", trajectory=True, optional=True, metavar="N")
    lr_scheduler: str = config_field("cosine", "learning-rate decay after warmup", "choice", flag="scheduler",
                               choices=SCHEDULERS, trajectory=True)
    warmup_steps: int = config_field(0, "steps of linear warmup from 0 to the learning rate", "non_negative",
                               flag="warmup_steps", trajectory=True, metavar="N")
    max_grad_norm: Optional[float] = config_field(1.0, "clip the gradient's global norm (None: no clipping)",
                                            "positive_number", flag="max_grad_norm", trajectory=True, optional=True)
    mixed_precision: str = config_field("no", "bfloat16 mixed precision (bf16) through accelerate; weights stay float32",
                                  "choice", flag="bf16", choices=PRECISIONS, trajectory=True)
    sharding: str = config_field("none", "fsdp2: shard the frozen bases' blocks and the connections across the "
                                 "processes of a torchrun launch (torch FSDP2); zero3: partition every parameter "
                                 "with DeepSpeed ZeRO-3 (pip install deepspeed); none: each process holds everything",
                                 "choice", flag="sharding", choices=SHARDINGS, trajectory=True)
    padding_side: str = config_field("right", "where batches are padded", "choice", flag="padding_side",
                               choices=("right", "left"), trajectory=True)
    preserve_weight: float = config_field(
        0.0, "weight of the KL divergence from the anchor's own next-token distribution on the preservation texts "
        "(--preserve-data), added to the loss; 0: off", "non_negative_number", flag="preserve_weight", trajectory=True)
    preserve_ratio: float = config_field(1.0, "preservation texts per training example", "positive_number",
                                         flag="preserve_ratio", trajectory=True)
    eval_every: Optional[int] = config_field(None, "evaluate every N steps (default: at the end, with eval data)",
                                       "positive", flag="eval_every", optional=True, metavar="N")
    eval_batch_size: Optional[int] = config_field(None, "examples per evaluation batch (default: batch_size)", "positive",
                                            optional=True)
    eval_generate: bool = config_field(True, "score exact match of greedy completions on prompt/completion eval data",
                                 "bool", flag="eval_generate")
    eval_generate_max_examples: Optional[int] = config_field(32, "score generation on the first N eval examples",
                                                       "positive", optional=True)
    eval_max_new_tokens: int = config_field(64, "the most tokens generated per eval prompt", "positive")
    save_every: Optional[int] = config_field(None, "write a resumable checkpoint every N steps (default: none)", "positive",
                                       flag="save_every", optional=True, metavar="N")
    keep_last: int = config_field(2, "complete checkpoints kept; older ones are deleted", "positive", flag="keep_last",
                            metavar="N")
    log_every: int = config_field(10, "append train loss, lr and tokens/s to metrics.jsonl every N steps", "positive",
                            flag="log_every", metavar="N")
    cache_augment_states: bool = config_field(False, "compute the frozen augments' states once and reuse them every "
                                        "epoch (disk, memory-mapped)", "bool", flag="cache_augment_states")
    cache_anchor_states: bool = config_field(False, "compute the frozen anchor's blocks below the lowest connection "
                                             "once per text and replay them at every later step (memory: the texts' "
                                             "tokens times the anchor's width)", "bool", flag="cache_anchor_states")
    cpu: bool = config_field(False, "train on the CPU even when an accelerator is present", "bool", flag="cpu")
    progress_bar: bool = config_field(True, "show a tqdm bar with loss and tokens/s", "bool", flag="progress")

    def __post_init__(self) -> None:
        for spec in fields(self):
            setattr(self, spec.name, check_value(spec, getattr(self, spec.name)))
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("Give either max_steps or epochs, not both")

    def to_yaml(self) -> str:
        """The config as YAML text."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "TrainingConfig":
        """Parse YAML text (a mapping of field names to values)."""
        data = parse_yaml(text, "the training config") or {}
        if not isinstance(data, dict):
            raise ValueError(f"A TrainingConfig in YAML must be a mapping of fields, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TrainingConfig":
        """Read a ``.json``, ``.yaml`` or ``.yml`` file."""
        path = Path(path)
        try:
            text = read_text(path, "training config")
        except OSError as err:
            raise ValueError(f"{path}: cannot read the training config ({err})") from None
        try:
            data = parse_json(text, str(path)) if path.suffix == ".json" else parse_yaml(text, str(path)) or {}
            if not isinstance(data, dict):
                raise ValueError(f"A TrainingConfig must be a mapping of fields, got {type(data).__name__}")
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            message = str(err)
            raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None

    def trajectory_differences(self, other: "TrainingConfig") -> list[str]:
        """The trajectory fields on which two configs differ, as ``"name: a != b"`` lines."""
        return [
            f"{name}: {getattr(other, name)!r} != {getattr(self, name)!r}"
            for name in TRAJECTORY_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]


TRAJECTORY_FIELDS = tuple(f.name for f in fields(TrainingConfig) if f.metadata["trajectory"])
BOOLEAN_FIELDS = tuple(f.name for f in fields(TrainingConfig) if f.metadata["check"] == "bool")
