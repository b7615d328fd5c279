"""TrainingConfig: every setting of a training run (dataclass, JSON and YAML round trip)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("no", "bf16")

# Fields that decide the trajectory of the weights: a resumed run must agree with its checkpoint on them.
TRAJECTORY_FIELDS = (
    "seed",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "epochs",
    "lr_scheduler",
    "warmup_steps",
    "max_grad_norm",
    "mixed_precision",
    "padding_side",
)

BOOLEAN_FIELDS = ("eval_generate", "cache_augment_states", "cpu", "progress_bar")


@dataclass
class TrainingConfig:
    """How the composition is trained. Only the connections learn; the base models stay frozen."""

    seed: int = 0  # seeds the data order (one permutation per epoch) and every RNG
    learning_rate: float = 3e-4  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_epsilon: float = 1e-8  # AdamW epsilon
    batch_size: int = 8  # examples per micro-batch (per process)
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    max_steps: Optional[int] = None  # optimiser steps to run; None -> `epochs` passes over the data
    epochs: Optional[int] = None  # passes over the data when max_steps is None (None -> 1)
    lr_scheduler: str = "cosine"  # decay after warmup: cosine, linear, constant, constant_with_warmup
    warmup_steps: int = 0  # steps of linear warmup from 0 to learning_rate
    max_grad_norm: Optional[float] = 1.0  # clip the gradient's global norm; None -> no clipping
    mixed_precision: str = "no"  # "bf16": autocast to bfloat16 through accelerate (weights stay float32)
    padding_side: str = "right"  # where the collator pads: "right" or "left"
    eval_every: Optional[int] = None  # evaluate every N steps; None -> only at the end (with eval data)
    eval_batch_size: Optional[int] = None  # examples per evaluation batch; None -> batch_size
    eval_generate: bool = True  # exact match of greedy generations on prompt/completion eval data
    eval_generate_max_examples: Optional[int] = 32  # score generation on the first N eval examples
    eval_max_new_tokens: int = 64  # the most tokens generated per eval prompt
    save_every: Optional[int] = None  # write a resumable checkpoint every N steps; None -> none
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    log_every: int = 10  # append train loss, lr and tokens/s to metrics.jsonl every N steps
    cache_augment_states: bool = False  # compute the frozen augments' states once, memory-mapped on disk
    cpu: bool = False  # train on the CPU even when an accelerator is present
    progress_bar: bool = True  # show a tqdm bar with loss and tokens/s

    def __post_init__(self) -> None:
        for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {value!r}") from None
            elif value is None and name != "max_grad_norm":
                raise ValueError(f"{name} must be a number, got None")
            elif isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                raise ValueError(f"{name} must be a number, got {value!r}")
            value = getattr(self, name)
            if value is not None and not _finite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in BOOLEAN_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in 0..2**32-1, got {self.seed!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon!r}")
        positive = ("batch_size", "gradient_accumulation_steps", "keep_last", "log_every", "eval_max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        optional_positive = ("max_steps", "epochs", "eval_every", "save_every", "eval_batch_size", "eval_generate_max_examples")
        for name in optional_positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("Give either max_steps or epochs, not both")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if not isinstance(self.lr_scheduler, str) or self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}; got {self.lr_scheduler!r}")
        if not isinstance(self.mixed_precision, str) or self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}; got {self.mixed_precision!r}")
        if not isinstance(self.padding_side, str) or self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"A TrainingConfig is a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ValueError(f"Unknown TrainingConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainingConfig":
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        """The config as YAML text."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "TrainingConfig":
        """Parse YAML text (a mapping of field names to values)."""
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"A TrainingConfig in YAML must be a mapping of fields, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TrainingConfig":
        """Read a ``.json``, ``.yaml`` or ``.yml`` file."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot read the training config ({err})") from None
        try:
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err})") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None

    def trajectory_differences(self, other: "TrainingConfig") -> list[str]:
        """The trajectory fields on which two configs differ, as ``"name: a != b"`` lines."""
        return [
            f"{name}: {getattr(other, name)!r} != {getattr(self, name)!r}"
            for name in TRAJECTORY_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
