"""The package's layout holds: each layer imports only from layers below it, old import paths still work, and every
script in experiments/ and benchmarks/ runs ``--help`` with today's code."""

import ast
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "lmcompose"

# Lower numbers sit lower: a module may import from its own layer and the layers below it, never from above.
LAYERS = {"version": 0, "testing": 0, "_moved": 0, "core": 1, "io": 2, "model": 3, "train": 4, "demos": 5, "cli": 6}
TOP = ("__init__", "__main__")  # the package's face: it may import any layer


def layer_of(module: str) -> str:
    """'lmcompose.io.bases' -> 'io'; 'lmcompose.version' -> 'version'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every lmcompose import in a file, those inside functions included."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("lmcompose"):  # `from . import x` imports the module x; else the module named
                names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
                found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmcompose")]
    return found


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own in TOP:
            continue
        assert own in LAYERS, f"{path} is in no layer; add its folder to LAYERS"
        for line, target in imported_modules(path):
            theirs = layer_of(target)
            if theirs in TOP or LAYERS[theirs] > LAYERS[own] or (LAYERS[own] == 0 and theirs != own):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({theirs})")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_import(tmp_path, monkeypatch):
    fake = tmp_path / "lmcompose" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from ..train.recipe import train\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "lmcompose")
    assert imported_modules(fake / "bad.py") == [(2, "lmcompose.train.recipe")]
    with pytest.raises(AssertionError, match=r"core/bad.py:2 \(core\) imports lmcompose.train.recipe \(train\)"):
        test_no_module_imports_from_a_higher_layer()


@pytest.mark.parametrize("old,new", [("lmcompose.training", "lmcompose.train.recipe"),
                                     ("lmcompose.tasks.kv", "lmcompose.demos.kv.task"),
                                     ("lmcompose.cross_attention", "lmcompose.core.cross_attention")])
def test_an_old_module_path_is_the_new_module_with_a_warning_naming_it(old, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and f"moved to {new}" in str(w.message) for w in caught)


def test_a_split_module_path_holds_the_names_of_every_part():
    sys.modules.pop("lmcompose.checkpoint", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from lmcompose.checkpoint import atomic_write, save_composition
        from lmcompose.data import Collator, EpochShuffleSampler, read_jsonl
        from lmcompose.models import load_base, tiny_causal_lm
    from lmcompose import testing
    from lmcompose.io import atomic, bases, collate, composition_files, jsonl
    from lmcompose.train import sampler
    assert (atomic_write, save_composition) == (atomic.atomic_write, composition_files.save_composition)
    assert (Collator, EpochShuffleSampler, read_jsonl) == (collate.Collator, sampler.EpochShuffleSampler, jsonl.read_jsonl)
    assert (load_base, tiny_causal_lm) == (bases.load_base, testing.tiny_causal_lm)


def test_every_script_in_experiments_and_benchmarks_runs_help():
    scripts = sorted(p for folder in ("experiments", "benchmarks") for p in (ROOT / folder).rglob("*.py")
                     if p.name != "common.py")  # common.py: helpers the scripts import, not a script
    assert len(scripts) >= 8
    # One interpreter runs them all (each import of torch and transformers costs seconds); each runs as __main__
    # from its own folder, and a deprecated lmcompose path is an error.
    runner = (
        "import json, os, runpy, sys, warnings\n"
        "warnings.filterwarnings('error', category=DeprecationWarning, module='lmcompose')\n"
        "warnings.filterwarnings('error', message='lmcompose.*has moved')\n"
        "results = {}\n"
        "for path in sys.argv[1:]:\n"
        "    folder = os.path.dirname(path)\n"
        "    sys.path.insert(0, folder); sys.modules.pop('common', None); os.chdir(folder)\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "        results[path] = 'no usage: the script ran instead of printing --help'\n"
        "    except SystemExit as exit_:\n"
        "        results[path] = 'ok' if exit_.code in (0, None) else f'exit {exit_.code}'\n"
        "    except BaseException as err:\n"
        "        results[path] = f'{type(err).__name__}: {err}'\n"
        "    sys.path.remove(folder)\n"
        "print('RESULTS ' + json.dumps(results))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", runner, *map(str, scripts)], capture_output=True, text=True,
                         timeout=600, env=env)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, out.stderr[-2000:]
    results = json.loads(line[len("RESULTS "):])
    failed = {Path(k).relative_to(ROOT).as_posix(): v for k, v in results.items() if v != "ok"}
    assert not failed, failed
    assert out.stdout.count("usage:") == len(scripts)
