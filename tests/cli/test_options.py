"""cli/options.py: the train command's flags, help and defaults come from the config fields; options build configs."""

from dataclasses import fields

from lmcompose.cli.options import DEFAULTS, build_parser, config_flags, config_from, parse_options
from lmcompose.core.config import CompositionConfig
from lmcompose.train.config import TrainingConfig


def test_every_config_field_with_a_flag_is_a_train_option_with_its_help_and_default():
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    actions = {a.dest: a for a in train._actions}
    flagged = config_flags()
    assert {spec.metadata["flag"] for spec, _ in flagged} >= {"lr", "batch_size", "grad_accum", "bf16", "connections"}
    for spec, _ in flagged:
        action = actions[spec.metadata["flag"]]
        assert action.help.startswith(spec.metadata["help"]), spec.name
    assert DEFAULTS["train"]["lr"] == TrainingConfig.learning_rate and DEFAULTS["train"]["bf16"] is False
    assert "learning_rate" not in actions and "adam_beta1" not in actions  # fields without a flag stay off the CLI


def test_parsed_options_build_the_configs_field_by_field():
    _, opts = parse_options(["train", "--anchor", "a", "--augment", "b", "--data", "d", "--output", "o", "--lr", "0.01",
                             "--grad-accum", "3", "--bf16", "--no-progress", "--connections", "1:2,3:-1"])
    training = config_from(TrainingConfig, opts)
    assert (training.learning_rate, training.gradient_accumulation_steps) == (0.01, 3)
    assert training.mixed_precision == "bf16" and training.progress_bar is False
    assert training.adam_beta2 == TrainingConfig.adam_beta2  # no flag: the field's default
    composition = config_from(CompositionConfig, opts)
    assert composition.connections == [[1, 2], [3, -1]] and composition.num_heads is None
    _, opts = parse_options(["train", "--anchor", "a", "--augment", "b", "--data", "d", "--output", "o"])
    assert config_from(TrainingConfig, opts) == TrainingConfig()
    assert {f.name for f in fields(TrainingConfig) if f.metadata["flag"]} == {
        spec.name for spec, cls in config_flags() if cls is TrainingConfig}
