"""The ``lmcompose`` command line: ``demo``, ``train``, ``generate`` and ``eval``, thin layers over the library."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..io.locks import output_lock
from ..train.config import TrainingConfig
from .options import DEMO_OUTPUTS, CliError, build_parser, config_from, parse_options

__all__ = ["CliError", "build_parser", "main", "parse_options", "run_demo", "run_eval", "run_generate", "run_train"]


def _load(opts: argparse.Namespace, empty: bool = False) -> tuple[Any, Any, list, list]:
    """The bases named by the flags: (anchor, its tokenizer, augments, their tokenizers).

    An augment's tokenizer is the one beside its model unless ``--augment-tokenizer`` names another. ``empty``:
    the bases' architectures only, their weights to come from rank 0 (``io.bases.load_base(empty=True)``).
    """
    from ..io.bases import load_base as load_whole, load_tokenizer

    load_base = functools.partial(load_whole, empty=True) if empty else load_whole
    trust = bool(opts.trust_remote_code)
    named = list(opts.augment_tokenizer or [])
    if len(named) > len(opts.augment):
        raise CliError(
            f"--augment-tokenizer was given {len(named)} times for {len(opts.augment)} --augment model(s); "
            "give at most one per --augment, in the same order"
        )
    anchor, tokenizer = _with_flag("--anchor", load_base, opts.anchor, None, trust)
    loaded = [_with_flag("--augment", load_base, path, None, trust, a >= len(named)) for a, path in enumerate(opts.augment)]
    augments, augment_tokenizers = [m for m, _ in loaded], [t for _, t in loaded]
    for a, path in enumerate(named):
        augment_tokenizers[a] = _with_flag("--augment-tokenizer", load_tokenizer, path, trust)
    return anchor, tokenizer, augments, augment_tokenizers


def _with_flag(flag: str, fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except (FileNotFoundError, ValueError, NotImplementedError) as err:
        raise CliError(f"{flag}: {err}") from None


def _composed(opts: argparse.Namespace) -> tuple[Any, Any]:
    """The composed model for generate / eval: the saved composition, or an identity one with --no-composition."""
    from ..model.composed import ComposedModel

    anchor, tokenizer, augments, augment_tokenizers = _load(opts)
    kwargs = {"tokenizer": tokenizer, "augment_tokenizer": augment_tokenizers}  # aligned when they differ
    if opts.composition:
        model = _with_flag(
            "--composition", functools.partial(ComposedModel.from_composition, **kwargs),
            opts.composition, anchor, augments,
        )
    else:
        model = ComposedModel(anchor, augments, **kwargs)
    return model, tokenizer


def run_train(opts: argparse.Namespace) -> int:
    """``lmcompose train``: nothing is written before the models and data load and pass their checks; the output
    directory is locked from the moment ``train_args.yaml`` is written into it to the end of the run."""
    import yaml
    from accelerate.utils import set_seed

    from ..core.config import CompositionConfig
    from ..io.atomic import atomic_write_text
    from ..io.datasets import load_dataset
    from ..model.composed import ComposedModel
    from ..train.engine import is_main_launch
    from ..train.recipe import train
    from ..train.sharding import check_sharding, launched_processes

    check_sharding(config_from(TrainingConfig, opts), launched_processes())  # before any model loads
    # FSDP2: the ranks but 0 build the bases empty and receive their shards from rank 0 (train/sharding.py); ZeRO-3
    # partitions the bases every rank loaded (train/zero3.py)
    empty = opts.sharding == "fsdp2" and not is_main_launch()
    anchor, tokenizer, augments, augment_tokenizers = _load(opts, empty=empty)
    composition = config_from(CompositionConfig, opts)
    set_seed(opts.seed)  # the seed decides the initial connection weights too: a run is a function of its options
    model = ComposedModel(anchor, augments, composition, tokenizer=tokenizer, augment_tokenizer=augment_tokenizers,
                          checkpoint_connections=opts.checkpoint_connections)
    data = {flag: _with_flag(f"--{flag.replace('_', '-')}", load_dataset, getattr(opts, flag), tokenizer,
                             opts.max_length) if getattr(opts, flag) else None
            for flag in ("data", "eval_data", "preserve_data")}
    config = config_from(TrainingConfig, opts)
    main_process = is_main_launch()
    if main_process:
        print(model.summary(), file=sys.stderr)
    recorded = {k: v for k, v in vars(opts).items() if k != "resume" and v is not None}
    if opts.connections is not None:  # in the flag's own form, so the file works as --config
        recorded["connections"] = ",".join(f"{i}:{j}" for i, j in opts.connections)

    def record_options() -> None:  # inside the run's lock: a second run cannot overwrite the first one's record
        if main_process:
            atomic_write_text(Path(opts.output) / "train_args.yaml", yaml.safe_dump(recorded, sort_keys=False))

    result = train(model, data["data"], data["eval_data"], config, opts.output, resume=opts.resume, tokenizer=tokenizer,
                   preserve_dataset=data["preserve_data"], on_locked=record_options)
    if result.interrupted:
        if main_process:
            print(f"lmcompose train: {result.interrupted} at step {result.step}: checkpoint written to "
                  f"{result.checkpoint}; continue with --resume", file=sys.stderr)
        return 128 + int(signal.Signals[result.interrupted])  # the shell's code for a death by that signal
    loss = "n/a" if result.train_loss is None else f"{result.train_loss:.4f}"
    if main_process:
        print(f"trained {result.step} steps (last train loss {loss}); composition written to {result.composition_dir}")
    return 0


def run_generate(opts: argparse.Namespace) -> int:
    """``lmcompose generate``: the completion streams to stdout."""
    from transformers import TextStreamer

    from ..core.tokens import encode_prompt
    from ..io.input_checks import composed_context_length
    from ..model.completion import complete

    try:
        opts.prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CliError(f"lmcompose generate: error: --prompt is not UTF-8 text (character {err.start + 1} is "
                       f"{opts.prompt[err.start]!r}); give the prompt as text") from None
    model, tokenizer = _composed(opts)
    limit, role = composed_context_length(model)
    prompt_tokens = len(encode_prompt(tokenizer, opts.prompt))
    if limit is not None and prompt_tokens + opts.max_new_tokens > limit:
        raise CliError(
            f"--prompt ({prompt_tokens} tokens) plus --max-new-tokens {opts.max_new_tokens} exceeds the {limit} "
            f"positions the {role} reads (config.max_position_embeddings); shorten the prompt or lower --max-new-tokens"
        )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {"max_new_tokens": opts.max_new_tokens, "do_sample": opts.do_sample, "temperature": opts.temperature}
    for name in ("top_k", "top_p", "repetition_penalty", "seed"):
        if getattr(opts, name) is not None:
            kwargs[name] = getattr(opts, name)
    if opts.no_composition:
        with model.disable_composition():
            complete(model, tokenizer, opts.prompt, streamer=streamer, **kwargs)
    else:
        complete(model, tokenizer, opts.prompt, streamer=streamer, **kwargs)
    return 0


def run_eval(opts: argparse.Namespace) -> int:
    """``lmcompose eval``: prints a table; ``--output`` also writes JSON, the directory it goes to locked meanwhile."""
    with output_lock(Path(opts.output).parent, "evaluation") if opts.output else nullcontext():
        return _evaluate(opts)


def _evaluate(opts: argparse.Namespace) -> int:
    from ..io.atomic import atomic_write_text
    from ..io.datasets import load_dataset
    from ..io.input_checks import check_example_lengths
    from ..train.evaluation import evaluate, format_table

    model, tokenizer = _composed(opts)
    data = _with_flag("--data", load_dataset, opts.data, tokenizer, opts.max_length)
    check_example_lengths(data, model, "--data")
    kwargs = dict(
        batch_size=opts.batch_size, generate=opts.generate, max_new_tokens=opts.max_new_tokens, max_examples=opts.max_examples
    )
    if opts.no_composition:
        with model.disable_composition():
            metrics = evaluate(model, data, tokenizer, **kwargs)
    else:
        metrics = evaluate(model, data, tokenizer, **kwargs)
    metrics["truncated_examples"] = data.num_truncated
    print(format_table(metrics))
    if opts.output:
        atomic_write_text(opts.output, json.dumps(metrics, indent=2))
    return 0


def run_demo(opts: argparse.Namespace) -> int:
    """``lmcompose demo [kv|facts]``: the demo's table printed and written to disk with its chart."""
    output = opts.output or DEMO_OUTPUTS[opts.name]
    if opts.name == "facts":
        if opts.preset != "quick":
            raise CliError("lmcompose demo: error: --preset applies to the kv demo; the facts demo has one preset")
        from ..demos.facts.config import preset, with_settings
        from ..demos.facts.pipeline import run_demo as facts

        try:
            config = with_settings(preset(opts.seed), opts.set or [])
        except ValueError as err:
            raise CliError(f"lmcompose demo: error: --set: {err}") from None
        results = facts(output, progress=opts.progress, config=config, seed=opts.seed)
    else:
        if opts.set:
            raise CliError("lmcompose demo: error: --set applies to the facts demo; the kv demo takes --preset")
        from ..demos.kv.pipeline import run_demo as kv

        results = kv(output, preset=opts.preset, progress=opts.progress, seed=opts.seed)
    table = Path(output) / "results.md"
    if table.is_file():
        print(table.read_text(encoding="utf-8"))
    print(f"results written to {output}/ (results.json, results.md, results.png)")
    return 0 if results else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": run_demo,
    "train": run_train,
    "generate": run_generate,
    "eval": run_eval,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lmcompose`` console script; returns the exit status (2 for bad input)."""
    from ..io.atomic import DiskFullError
    from ..io.composition_files import CompositionMismatchError
    from ..io.locks import OutputInUseError
    from ..io.jsonl import DataError
    from ..train.faults import TrainingDivergedError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    prefix = f"lmcompose {command}" if command else "lmcompose"
    try:
        command, opts = parse_options(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return COMMANDS[command](opts)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except CliError as err:
        message = _one_line(err)
        print(message if message.startswith("lmcompose") else f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    except (DataError, CompositionMismatchError, FileNotFoundError, FileExistsError, NotImplementedError, ValueError,
            DiskFullError, OutputInUseError) as err:  # refused, nothing lost: exit 2
        if os.environ.get("LMCOMPOSE_DEBUG"):
            raise
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except TrainingDivergedError as err:  # not bad input: the run itself failed
        if os.environ.get("LMCOMPOSE_DEBUG"):
            raise
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # the file system refused (permissions, disk full): one line, not a traceback
        if os.environ.get("LMCOMPOSE_DEBUG"):
            raise
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, tokenizing); training handles its own
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 128 + int(signal.SIGINT)


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
