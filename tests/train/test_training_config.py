"""train/config.py: the training config's round trips, checks, and the fields that decide the trajectory."""

from dataclasses import fields

import pytest

from lmcompose.train.config import BOOLEAN_FIELDS, TRAJECTORY_FIELDS, TrainingConfig


def test_config_round_trips_through_json_and_yaml(tmp_path):
    cfg = TrainingConfig(learning_rate=1e-3, max_steps=7, mixed_precision="bf16", cache_augment_states=True)
    assert TrainingConfig.from_json(cfg.to_json()) == cfg
    assert TrainingConfig.from_yaml(cfg.to_yaml()) == cfg
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-3\nmax_steps: 7\nmixed_precision: bf16\ncache_augment_states: true\n")
    assert TrainingConfig.load(tmp_path / "c.yaml") == cfg  # YAML reads 1e-3 as a string; it is converted
    with pytest.raises(ValueError, match=r"Unknown TrainingConfig fields \['lr'\]"):
        TrainingConfig.from_dict({"lr": 1.0})
    with pytest.raises(ValueError, match="either max_steps or epochs"):
        TrainingConfig(max_steps=3, epochs=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        TrainingConfig(lr_scheduler="exotic")


def test_trajectory_fields_are_compared_on_resume_and_the_rest_are_not():
    assert {"seed", "learning_rate", "batch_size", "gradient_accumulation_steps", "mixed_precision"} <= set(TRAJECTORY_FIELDS)
    assert not {"eval_every", "save_every", "keep_last", "log_every", "progress_bar"} & set(TRAJECTORY_FIELDS)
    assert TrainingConfig(learning_rate=1e-3).trajectory_differences(TrainingConfig(learning_rate=2e-3)) == [
        "learning_rate: 0.002 != 0.001"]
    assert TrainingConfig(save_every=5).trajectory_differences(TrainingConfig()) == []
    assert set(BOOLEAN_FIELDS) == {f.name for f in fields(TrainingConfig) if f.type == "bool"}
