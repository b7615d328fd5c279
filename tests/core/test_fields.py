"""core/fields.py: a config field's check gives the value back or a message naming the field and what it must be."""

from dataclasses import dataclass

import pytest

from lmcompose.core.fields import DictConfig, check_value, config_field


@dataclass
class Example(DictConfig):
    count: int = config_field(1, "how many", "positive", flag="count")
    limit: object = config_field(None, "a limit", "positive", optional=True)
    rate: float = config_field(0.5, "a rate", "positive_number")
    beta: float = config_field(0.9, "a beta", "beta")
    kind: str = config_field("a", "a kind", "choice", choices=("a", "b"))
    on: bool = config_field(False, "a switch", "bool")

    def __post_init__(self):
        for spec in self.__dataclass_fields__.values():
            setattr(self, spec.name, check_value(spec, getattr(self, spec.name)))


@pytest.mark.parametrize("field,value,message", [
    ("count", 0, "count must be a positive integer, got 0"),
    ("count", True, "count must be a positive integer, got True"),
    ("limit", -1, "limit must be a positive integer or None, got -1"),
    ("rate", 0, "rate must be > 0, got 0"),
    ("rate", "fast", "rate must be a number, got 'fast'"),
    ("rate", float("inf"), "rate must be a finite number, got inf"),
    ("rate", 10**400, "rate must be a finite number"),
    ("beta", 1.0, r"beta must be in \[0, 1\), got 1.0"),
    ("kind", "c", "kind must be one of a, b; got 'c'"),
    ("on", 1, "on must be true or false, got 1"),
])
def test_a_bad_value_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        Example(**{field: value})


def test_values_that_pass_and_the_dict_round_trip():
    config = Example(rate="1e-3", limit=None)  # YAML 1.1 reads 1e-3 as text
    assert config.rate == 1e-3 and config.limit is None
    assert Example.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"Unknown Example fields \['speed'\]"):
        Example.from_dict({"speed": 1})
    with pytest.raises(ValueError, match="A Example is a mapping"):
        Example.from_dict([1])
    assert Example.__dataclass_fields__["count"].metadata["flag"] == "count"
