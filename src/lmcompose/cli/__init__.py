"""The ``lmcompose`` command line: ``demo``, ``train``, ``generate`` and ``eval``, thin layers over the library."""

from .main import COMMANDS, main, run_demo, run_eval, run_generate, run_train
from .options import CliError, build_parser, parse_options

__all__ = ["COMMANDS", "CliError", "build_parser", "main", "parse_options", "run_demo", "run_eval", "run_generate",
           "run_train"]
