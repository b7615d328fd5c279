"""What a hostile or clumsy user tried, each finding as a test: two runs in one directory, flipped bits, replaced
base weights, a changed --num-heads on resume, a full disk, and files and flags built to break the parsers."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcompose.cli import main
from lmcompose.io.composition_files import WEIGHTS_NAME
from lmcompose.train.checkpoints import STATE_NAME, complete_checkpoints
from lmcompose.train.run_log import read_metrics

from helpers import char_tokenizer, reverse_task, save_bases, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).parents[2] / "src")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    anchor, augment = save_bases(root)
    return {"root": root, "anchor": str(anchor), "augment": str(augment),
            "train": str(write_jsonl(root / "train.jsonl", reverse_task(24, seed=0)))}


def args(work, output, *extra):
    return ["train", "--anchor", work["anchor"], "--augment", work["augment"], "--data", work["train"],
            "--output", str(output), "--batch-size", "4", "--lr", "1e-2", "--no-progress", "--cpu", "--log-every", "1",
            "--connections", "0:1,1:1", *extra]


def last_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_a_second_trainer_on_a_live_output_is_refused_naming_the_first_and_nothing_is_mixed(work, tmp_path, capsys):
    run = tmp_path / "x"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC)
    first = subprocess.Popen([sys.executable, "-m", "lmcompose", *args(work, run, "--max-steps", "400", "--save-every",
                                                                        "50")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".lmcompose.lock.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        yaml_before = (run / "train_args.yaml").read_text() if (run / "train_args.yaml").exists() else None
        for extra in ((), ("--resume",)):
            assert main(args(work, run, "--max-steps", "5", "--seed", "5", "--lr", "1e-3", *extra)) == 2
            assert f"is in use by process {first.pid}" in last_error(capsys)
        assert yaml_before is None or (run / "train_args.yaml").read_text() == yaml_before
        first.wait(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, first.stderr.read()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 401))  # one run's records, all of them
    assert "seed: 5" not in (run / "train_args.yaml").read_text()


def test_flipped_bits_and_a_config_of_another_save_are_refused_and_resume_falls_back(work, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(args(work, run, "--max-steps", "4", "--save-every", "2", "--keep-last", "2")) == 0
    weights = run / "composition" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # one bit of one weight
    weights.write_bytes(bytes(data))
    eval_args = ["eval", "--anchor", work["anchor"], "--augment", work["augment"], "--data", work["train"],
                 "--composition", str(run / "composition"), "--no-generate"]
    assert main(eval_args) == 2 and "does not have the sha256 composition_config.json records" in last_error(capsys)
    newest = run / "checkpoints" / "step-4"
    flipped = bytearray((newest / WEIGHTS_NAME).read_bytes())
    flipped[-7] ^= 0x10
    (newest / WEIGHTS_NAME).write_bytes(bytes(flipped))
    assert main(args(work, run, "--max-steps", "4", "--save-every", "2", "--keep-last", "2", "--resume")) == 0
    capsys.readouterr()
    assert json.loads((run / "checkpoints" / "step-4" / STATE_NAME).read_text())["step"] == 4  # rewritten from step 2
    heads = tmp_path / "heads"  # a --num-heads 8 config beside a 4-head save's weights
    assert main(args(work, heads, "--max-steps", "1", "--num-heads", "8")) == 0
    shutil.copy(run / "composition" / WEIGHTS_NAME, heads / "composition" / WEIGHTS_NAME)
    eval_args[eval_args.index("--composition") + 1] = str(heads / "composition")
    assert main(eval_args) == 2 and "sha256" in last_error(capsys)


def test_bases_with_every_non_embedding_weight_replaced_are_refused(work, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "r"
    assert main(args(work, run, "--max-steps", "2", "--save-every", "1")) == 0
    for role in ("anchor", "augment"):
        model = AutoModelForCausalLM.from_pretrained(work[role])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "embed" not in name:
                    p.add_(0.01)
        other = tmp_path / f"other_{role}"
        model.save_pretrained(other)
        char_tokenizer().save_pretrained(other)
    swapped = {**work, "anchor": str(tmp_path / "other_anchor")}
    assert main(["generate", "--anchor", swapped["anchor"], "--augment", work["augment"], "--prompt", "ab",
                 "--composition", str(run / "composition")]) == 2
    assert "anchor weights differ from those the composition was trained on (a digest of every tensor)" in last_error(capsys)
    assert main(args(swapped, run, "--max-steps", "2", "--save-every", "1", "--resume")) == 2
    assert "anchor weights differ" in last_error(capsys)


def test_the_augment_cache_of_an_augment_changed_in_place_is_rebuilt(work, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from lmcompose.core import introspect

    folder = tmp_path / "augment"
    shutil.copytree(work["augment"], folder)
    changed = {**work, "augment": str(folder)}
    run = tmp_path / "r"
    with caplog.at_level("INFO"):
        assert main(args(changed, run, "--max-steps", "1", "--cache-augment-states")) == 0
        assert main(args(changed, run, "--max-steps", "1", "--cache-augment-states")) == 0
    assert caplog.text.count("augment cache built") == 1 and "augment cache reused" in caplog.text
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)  # a block of the augment, nowhere near its embeddings
    model.save_pretrained(folder)  # the same path, other weights
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(args(changed, run, "--max-steps", "1", "--cache-augment-states")) == 0
    assert "augment cache built" in caplog.text and "reused" not in caplog.text
    manifest = json.loads((run / "augment_cache" / "train" / "manifest.json").read_text())
    assert manifest["augments"][0]["weights_digest"] == introspect.weights_digest(model)


def test_resume_with_another_number_of_heads_is_refused_naming_it(work, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(args(work, run, "--max-steps", "4", "--save-every", "2", "--num-heads", "4")) == 0
    shutil.rmtree(run / "composition")
    assert main(args(work, run, "--max-steps", "4", "--save-every", "2", "--num-heads", "8", "--resume")) == 2
    assert "its composition differs from the model's (checkpoint != now): num_heads: 4 != 8" in last_error(capsys)


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_leaves_no_temporaries(work, tmp_path, capsys,
                                                                                      monkeypatch):
    import lmcompose.io.atomic as atomic
    import lmcompose.io.composition_files as files
    import lmcompose.train.checkpoints as checkpoints

    run = tmp_path / "r"
    real_usage, real_save, calls = shutil.disk_usage, torch.save, []

    def usage_when_full(path):
        return real_usage(path)._replace(free=1000)

    def torch_save_until_full(obj, path, *rest, **kwargs):  # each checkpoint saves 3 files: step 3's first one fills it
        calls.append(path)
        if len(calls) <= 6:
            return real_save(obj, path, *rest, **kwargs)
        Path(path).write_bytes(b"x" * 64)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")  # torch's words for it

    monkeypatch.setattr(atomic.shutil, "disk_usage", usage_when_full)
    monkeypatch.setattr(checkpoints.torch, "save", torch_save_until_full)
    assert main(args(work, run, "--max-steps", "4", "--save-every", "1", "--keep-last", "1")) == 2
    message = last_error(capsys)
    assert "No space left on the device of" in message and "optimizer.pt" in message and "bytes free" in message
    assert complete_checkpoints(run / "checkpoints") == [run / "checkpoints" / "step-2"]  # the last good one
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()

    def safetensors_full(state, path, metadata=None):
        Path(path).write_bytes(b"x" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    fresh = tmp_path / "fresh"
    assert main(args(work, fresh, "--max-steps", "2")) == 0
    monkeypatch.setattr(files, "save_file", safetensors_full)
    assert main(args(work, fresh, "--max-steps", "3")) == 2
    assert "No space left on the device of" in last_error(capsys)
    assert not (fresh / "composition").exists()  # the old run's composition is not left beside the new records
    assert [p.name for p in fresh.iterdir() if p.name.startswith(".") and "lock" not in p.name] == []
    assert read_metrics(fresh / "metrics.jsonl")[-1]["step"] == 3


def test_hostile_trainer_states_are_skipped_or_refused_never_spun_on(work, tmp_path, capsys):
    from lmcompose.train.checkpoints import _state_digest

    run = tmp_path / "r"
    assert main(args(work, run, "--max-steps", "3", "--save-every", "1", "--keep-last", "3")) == 0
    shutil.rmtree(run / "composition")
    state_file = run / "checkpoints" / "step-3" / STATE_NAME
    state = json.loads(state_file.read_text())
    for value in (-5, 10**9, "3", None):
        edited = {**state, "step": value}
        state_file.write_text(json.dumps({**edited, "state_sha256": _state_digest(edited)}))  # passes its digest
        assert main(args(work, run, "--max-steps", "3", "--save-every", "1", "--keep-last", "3", "--resume")) == 0
        capsys.readouterr()  # step-3 skipped as damaged; the run resumed from step 2 and wrote step 3 again
        assert json.loads(state_file.read_text())["step"] == 3
        shutil.rmtree(run / "composition")
        state = json.loads(state_file.read_text())
    crafted = {**state, "position": 10**6}  # with its own digest recomputed, as a file built to pass would be
    state_file.write_text(json.dumps({**crafted, "state_sha256": _state_digest(crafted)}))
    started = time.monotonic()
    assert main(args(work, run, "--max-steps", "3", "--save-every", "1", "--keep-last", "3", "--resume")) == 2
    assert "batch 1000000 of an epoch of 6" in last_error(capsys) and time.monotonic() - started < 60


@pytest.mark.parametrize("case", ["alias bomb", "deep yaml", "deep json", "huge integer", "long jsonl line",
                                  "pickled weights", "surrogate prompt", "huge lr"])
def test_files_and_flags_built_to_break_the_parsers_are_one_line_errors(work, tmp_path, capsys, case):
    config = tmp_path / "c.yaml"
    argv = args(work, tmp_path / "o", "--max-steps", "1")
    if case == "alias bomb":
        config.write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nlr: [*b, *b, *b, *b]\n")
        argv, message = argv + ["--config", str(config)], "aliases (*name) are not allowed"
    elif case == "deep yaml":
        config.write_text("lr: " + "[" * 100_000 + "]" * 100_000 + "\n")
        argv, message = argv + ["--config", str(config)], "c.yaml"
    elif case == "deep json":
        data = tmp_path / "d.jsonl"
        data.write_text("[" * 100_000 + "]" * 100_000 + "\n")
        argv, message = args({**work, "train": str(data)}, tmp_path / "o"), "line 1: the JSON is nested too deeply"
    elif case == "huge integer":
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "a", "n": 1' + "0" * 5000 + "}\n")
        argv, message = args({**work, "train": str(data)}, tmp_path / "o"), "d.jsonl, line 1: not usable JSON"
    elif case == "long jsonl line":
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "' + "a" * (9 << 20) + '"}\n')
        argv, message = args({**work, "train": str(data)}, tmp_path / "o"), "line 1: the line is longer than 8,388,608"
    elif case == "pickled weights":
        folder = tmp_path / "pickled"
        shutil.copytree(work["augment"], folder)
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()

        class Payload:
            def __reduce__(self):
                return (os.system, ("true",))

        torch.save({"weights": state, "payload": Payload()}, folder / "pytorch_model.bin")
        argv, message = args({**work, "augment": str(folder)}, tmp_path / "o"), "--augment:"
    elif case == "surrogate prompt":
        argv = ["generate", "--anchor", work["anchor"], "--augment", work["augment"], "--no-composition", "--prompt",
                "ab\udcff"]
        message = "--prompt is not UTF-8 text"
    else:
        argv, message = argv + ["--lr", "1e300"], "learning_rate must be at most 3.4e+38 in size (it is used as a float32)"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and message in err.splitlines()[-1], err.splitlines()[-1]
