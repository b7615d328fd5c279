"""Module paths from before the layers became folders: each still imports, with a warning naming its new place.

``import lmcompose.training`` gives ``lmcompose.train.recipe`` itself (the same module object); a module that
was split in two (``lmcompose.checkpoint``, ``lmcompose.models``) gives a module holding the names of both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Optional

MOVED: dict[str, tuple[str, ...]] = {
    "lmcompose.alignment": ("lmcompose.core.alignment",),
    "lmcompose.config": ("lmcompose.core.config",),
    "lmcompose.cross_attention": ("lmcompose.core.cross_attention",),
    "lmcompose.introspect": ("lmcompose.core.introspect",),
    "lmcompose.masking": ("lmcompose.core.masking",),
    "lmcompose.augment_cache": ("lmcompose.io.augment_cache",),
    "lmcompose.checkpoint": ("lmcompose.io.composition_files", "lmcompose.io.atomic"),
    "lmcompose.data": ("lmcompose.io.jsonl", "lmcompose.io.datasets", "lmcompose.io.collate", "lmcompose.core.tokens",
                       "lmcompose.core.padding", "lmcompose.train.sampler"),
    "lmcompose.input_checks": ("lmcompose.io.input_checks",),
    "lmcompose.models": ("lmcompose.io.bases", "lmcompose.testing"),
    "lmcompose.completion": ("lmcompose.model.completion",),
    "lmcompose.composed": ("lmcompose.model.composed",),
    "lmcompose.generation": ("lmcompose.model.generation",),
    "lmcompose.evaluation": ("lmcompose.train.evaluation",),
    "lmcompose.run_log": ("lmcompose.train.run_log",),
    "lmcompose.training": ("lmcompose.train.recipe",),
    "lmcompose.training_config": ("lmcompose.train.config",),
    "lmcompose.training_faults": ("lmcompose.train.faults",),
    "lmcompose.training_state": ("lmcompose.train.checkpoints", "lmcompose.io.atomic"),
    "lmcompose.cli_args": ("lmcompose.cli.options",),
    "lmcompose.tasks": ("lmcompose.demos",),
    "lmcompose.tasks.kv": ("lmcompose.demos.kv.task",),
    "lmcompose.tasks.kv_pipeline": ("lmcompose.demos.kv.pipeline", "lmcompose.demos.kv.config"),
    "lmcompose.tasks.kv_report": ("lmcompose.demos.kv.report",),
    "lmcompose.tasks.kv_training": ("lmcompose.demos.kv.training",),
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and loads each as the module(s) it became."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> Optional[importlib.machinery.ModuleSpec]:
        """A spec for an old path; None for every other name."""
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname == "lmcompose.tasks")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        """The new module itself, or for a split module one that holds the names of every part."""
        targets = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} has moved to {' and '.join(targets)}; import it from there", DeprecationWarning, stacklevel=2
        )
        modules = [importlib.import_module(name) for name in targets]
        if len(modules) == 1:
            return modules[0]
        merged = types.ModuleType(spec.name, f"Old path of {', '.join(targets)}.")
        for module in reversed(modules):  # the first target wins a name that two of them define
            merged.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return merged

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module was complete when created."""


def install() -> None:
    """Put the finder in front of the import system, once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
