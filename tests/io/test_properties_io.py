"""Property-based tests of everything a user hands in: JSONL lines, argv, --config files, training configs and
composition files. Every failure is one of our errors with a message that says where; never another exception."""

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmcompose.cli as cli
from lmcompose import ComposedModel
from lmcompose.cli.options import CliError, build_parser, parse_options
from lmcompose.io.composition_files import CONFIG_NAME, WEIGHTS_NAME, CompositionMismatchError
from lmcompose.io.datasets import TokenizedDataset, tokenize_records
from lmcompose.io.jsonl import DataError, read_jsonl
from lmcompose.train import train
from lmcompose.train.checkpoints import DamagedCheckpointError, verify_checkpoint
from lmcompose.train.config import BOOLEAN_FIELDS, TrainingConfig

from helpers import char_tokenizer, tiny_pair

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="lmcompose-properties-"))
TOKENIZER = char_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def remove_work_folder():
    yield
    shutil.rmtree(WORK, ignore_errors=True)


def write(name: str, content: bytes) -> Path:
    path = WORK / name
    path.write_bytes(content)
    return path


# ----------------------------------------------------------------- JSONL

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
text = st.text(max_size=20)
records = st.one_of(
    st.fixed_dictionaries({"prompt": text, "completion": text}),
    st.fixed_dictionaries({"text": text}),
    st.dictionaries(st.sampled_from(["prompt", "completion", "text", "other"]), json_values, max_size=4),
)
lines = st.one_of(
    records.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8")),
    records.map(lambda r: json.dumps(r)[: len(json.dumps(r)) // 2].encode()),  # cut short
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=30),  # not necessarily UTF-8
    st.sampled_from([b"", b"   ", b'{"text": "\\ud800"}', b"\xef\xbb\xbf" + b'{"text": "bom"}', b"[" * 5000 + b"]" * 5000,
                     b'{"text": 1' + b"0" * 5000 + b"}", b'{"text": NaN}', b'{"prompt": "a", "completion": "b", "text": "c"}']),
)


@SETTINGS
@given(content=st.lists(lines, max_size=6), max_length=st.one_of(st.none(), st.integers(1, 12)))
def test_any_jsonl_file_reads_or_fails_with_a_data_error_naming_file_and_line(content, max_length):
    path = write("data.jsonl", b"\n".join(content))
    physical_lines = len(path.read_bytes().split(b"\n"))
    try:
        read = read_jsonl(path)
        dataset = tokenize_records(read, TOKENIZER, max_length=max_length)
    except DataError as err:
        message = str(err)
        assert message.startswith(str(path)), message
        where = re.match(re.escape(str(path)) + r", line (\d+): ", message)
        if where:
            assert 1 <= int(where.group(1)) <= physical_lines
        else:  # errors about the whole file
            assert "holds no examples" in message or "no example keeps a completion token" in message, message
    else:
        assert read.kind in ("completion", "text") and len(read.rows) == len(read.lines) >= 1
        assert all(1 <= line <= physical_lines for line in read.lines)
        assert len(dataset) + dataset.num_dropped == len(read.rows)
        for i in range(len(dataset)):
            item = dataset[i]
            assert len(item["input_ids"]) == len(item["labels"]) <= (max_length or 10**9)


# ----------------------------------------------------------------- argv

PARSER = build_parser()
SUBCOMMANDS = next(a for a in PARSER._actions if a.dest == "command").choices
FLAGS = sorted({s for sub in SUBCOMMANDS.values() for a in sub._actions for s in a.option_strings})
VALUES = ["0", "1", "-1", "3", "1e-3", "nan", "inf", "-inf", "abc", "", "3:1", "3:1,7:5", "9:0", "3-1", "left", "bf16",
          "cosine", "quick", "paper", "/nonexistent/path", "a.jsonl", "4294967296", "1.5", "--", "-", "=", "-x"]
tokens = st.one_of(st.sampled_from(FLAGS), st.sampled_from(sorted(SUBCOMMANDS)), st.sampled_from(VALUES),
                   st.text(max_size=10), st.sampled_from(FLAGS).map(lambda f: f + "=" + "1"))


@SETTINGS
@given(argv=st.lists(tokens, max_size=10), command=st.sampled_from(sorted(SUBCOMMANDS) + [None]))
def test_any_argv_exits_0_or_2_and_never_raises(argv, command):
    argv = ([command] if command else []) + argv
    stubs = {name: (lambda opts: 0) for name in cli.COMMANDS}  # parsing only: no model is loaded
    with mock.patch.dict(cli.COMMANDS, stubs):
        assert cli.main(argv) in (0, 2)


# ----------------------------------------------------------------- --config files

TRAIN_OPTIONS = sorted(a.dest for a in SUBCOMMANDS["train"]._actions if a.dest not in ("help", "config"))
yaml_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(), st.text(max_size=8),
                        st.sampled_from(["3:1", "cosine", "left", "a.jsonl", "1e-3"]),
                        st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@SETTINGS
@given(options=st.dictionaries(st.one_of(st.sampled_from(TRAIN_OPTIONS), st.text(max_size=8)), yaml_values, max_size=6),
       raw=st.one_of(st.none(), st.text(max_size=40)), flags=st.lists(st.sampled_from(["--lr", "2", "--epochs", "--max-steps"]), max_size=3))
def test_any_config_file_parses_or_fails_with_a_cli_error(options, raw, flags):
    path = write("run.yaml", (yaml.safe_dump(options) if raw is None else raw).encode("utf-8", "surrogatepass"))
    try:
        command, opts = parse_options(["train", "--config", str(path), *flags])
    except CliError as err:
        assert str(err)
    else:
        assert command == "train" and opts.anchor and opts.data and opts.output


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(sorted(TrainingConfig.__dataclass_fields__) + ["bogus"]),
                            st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(), st.text(max_size=6),
                                      st.integers(2**40, 2**70), st.sampled_from(["cosine", "bf16", "left", "1e-3"]))))
def test_training_config_from_any_dict_is_valid_or_a_value_error(data):
    try:
        config = TrainingConfig.from_dict(data)
    except ValueError as err:
        assert str(err)
    else:  # what is accepted has the types the training loop relies on
        assert TrainingConfig.from_json(config.to_json()) == config
        assert all(isinstance(getattr(config, name), bool) for name in BOOLEAN_FIELDS)
        numbers = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
        assert all(math.isfinite(getattr(config, name)) for name in numbers)
        assert isinstance(config.seed, int) and 0 <= config.seed < 2**32


# ----------------------------------------------------------------- composition files

BASES = tiny_pair()
SAVED = WORK / "saved"
ComposedModel(*BASES).save_composition(SAVED)
META = json.loads((SAVED / CONFIG_NAME).read_text())
PATHS = [(k,) for k in META] + [("anchor", k) for k in META["anchor"]] + [("augments", 0, k) for k in META["augments"][0]] \
    + [("config", k) for k in META["config"]] + [("connections", 0), ("connections", 0, 0)]


@SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(PATHS), json_values), min_size=1, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_a_damaged_composition_config_is_refused_with_a_clear_error(changes, raw):
    target = WORK / "damaged"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(SAVED, target)
    meta = json.loads(json.dumps(META))
    for path, value in changes:
        set_path(meta, path, value)
    (target / CONFIG_NAME).write_bytes(json.dumps(meta).encode() if raw is None else raw)
    try:
        ComposedModel.from_composition(target, *BASES)
    except (ValueError, CompositionMismatchError, FileNotFoundError) as err:
        assert str(err)


def set_path(meta, path, value):
    """Replace the entry at ``path`` (keys and list indices) when it still exists after earlier changes."""
    node = meta
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


# ----------------------------------------------------------------- damaged bytes

def damage(folder, name, flips, cut):
    """Flip the bits ``flips`` (byte index, bit) of ``folder/name`` and keep the first ``cut`` of it (a fraction)."""
    data = bytearray((folder / name).read_bytes())
    for index, bit in flips:
        data[index % len(data)] ^= 1 << bit
    if cut is not None:
        data = data[: int(len(data) * cut)]
    (folder / name).write_bytes(bytes(data))


damages = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), max_size=3)
cuts = st.one_of(st.none(), st.floats(0, 0.999))


@SETTINGS
@given(name=st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]), flips=damages, cut=cuts)
def test_a_damaged_composition_is_refused_or_loads_exactly_the_saved_weights(name, flips, cut):
    target = WORK / "bytes"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(SAVED, target)
    damage(target, name, flips, cut)
    try:
        model = ComposedModel.from_composition(target, *BASES)
    except (ValueError, CompositionMismatchError, FileNotFoundError) as err:
        assert str(err)
        return
    saved = ComposedModel.from_composition(SAVED, *BASES).composition_state_dict()
    assert all(torch.equal(model.composition_state_dict()[k], v) for k, v in saved.items())


CHECKPOINT = WORK / "run"
train(ComposedModel(*BASES), TokenizedDataset.from_token_ids([[0, 5, 6, 7]] * 8), None,
      TrainingConfig(max_steps=1, batch_size=4, save_every=1, progress_bar=False, cpu=True), CHECKPOINT)
STEP = CHECKPOINT / "checkpoints" / "step-1"
ORIGINAL = verify_checkpoint(STEP)


@SETTINGS
@given(name=st.sampled_from(sorted(p.name for p in STEP.iterdir())), flips=damages, cut=cuts)
def test_a_damaged_checkpoint_is_refused_or_reads_exactly_what_was_saved(name, flips, cut):
    target = WORK / "step-1"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(STEP, target)
    damage(target, name, flips, cut)
    try:
        files = verify_checkpoint(target)
    except DamagedCheckpointError as err:
        assert str(err)
        return
    assert files["state"] == ORIGINAL["state"]
    for key in ("optimizer", "scheduler", "rng"):
        assert repr(files[key]) == repr(ORIGINAL[key])  # tensors and plain values, printed in full
