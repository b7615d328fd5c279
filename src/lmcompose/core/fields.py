"""Config fields that carry their own help, check and command-line flag, and the checks themselves.

The configs (:class:`~lmcompose.core.config.CompositionConfig`, :class:`~lmcompose.train.config.TrainingConfig`)
declare each field once with :func:`config_field`; their validation and the CLI's flags are derived from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import Field, asdict, field, fields
from typing import Any, Optional, TypeVar

C = TypeVar("C", bound="DictConfig")

FLOAT32_MAX = 3.4028234663852886e38
# The checks a field's value must pass: what each accepts, said as the error message says it.
CHECKS = {
    "positive": "a positive integer",
    "non_negative": "a non-negative integer",
    "seed": "an integer in 0..2**32-1",
    "positive_number": "> 0",
    "non_negative_number": ">= 0",
    "beta": "in [0, 1)",
    "number": "a finite number",
    "bool": "true or false",
    "choice": "one of",
    "connections": "checked by the config itself",
}


class DictConfig:
    """The dict and JSON round trip of a config dataclass; unknown keys are refused, naming them."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"A {cls.__name__} is a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


def config_field(default: Any, help: str, check: str, *, flag: Optional[str] = None, choices: tuple = (),
                 trajectory: bool = False, optional: bool = False, metavar: Optional[str] = None) -> Any:
    """A config field that carries its own help, check and command-line flag.

    Args:
        default: the default value.
        help: one line, shown by ``--help`` (with the default).
        check: a key of :data:`CHECKS`: what the value must be.
        flag: the command-line flag without its dashes (``"lr"`` for ``--lr``); None: no flag.
        choices: the allowed values of a ``"choice"`` field (a flag named after one of two choices is a switch).
        trajectory: the field decides the trajectory of the weights (a resumed run must agree on it).
        optional: None is allowed too.
        metavar: the value's name in ``--help``.
    """
    metadata = {"help": help, "check": check, "flag": flag, "choices": choices, "trajectory": trajectory,
                "optional": optional, "metavar": metavar}
    return field(default=default, metadata=metadata)


def check_value(spec: Field, value: Any) -> Any:
    """``value`` for field ``spec`` after its check (a number given as YAML text becomes a float); else ValueError."""
    name, check, optional = spec.name, spec.metadata["check"], spec.metadata["optional"]
    if check == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if check == "choice":
        choices = spec.metadata["choices"]
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return value
    if check == "connections" or (optional and value is None and not check.endswith("number")):
        return value
    if check.endswith("number") or check in ("beta",):
        return _check_number(name, check, value, optional)
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (0 <= value < 2**32 if check == "seed" else value >= (1 if check == "positive" else 0))
    if not ok:
        raise ValueError(f"{name} must be {CHECKS[check]}{' or None' if optional else ''}, got {value!r}")
    return value


def _check_number(name: str, check: str, value: Any, optional: bool) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    elif value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be a number, got None")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not _finite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if abs(value) > FLOAT32_MAX:  # the optimiser and the model hold it in float32
        raise ValueError(f"{name} must be at most {FLOAT32_MAX:.3g} in size (it is used as a float32), got {value!r}")
    ok = {"positive_number": value > 0, "non_negative_number": value >= 0, "beta": 0 <= value < 1, "number": True}[check]
    if not ok:
        raise ValueError(f"{name} must be {CHECKS[check]}{' or None' if optional else ''}, got {value!r}")
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
