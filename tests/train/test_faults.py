"""Faults during training: signals, kills at any moment (checkpoint writes included), NaN losses, damaged files."""

import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmcompose import ComposedModel
from lmcompose.cli import main
from lmcompose.io.composition_files import CONFIG_NAME
from lmcompose.io.datasets import TokenizedDataset
from lmcompose.io.jsonl import DataError
from lmcompose.train.checkpoints import (
    OPTIMIZER_NAME,
    RNG_NAME,
    STATE_NAME,
    DamagedCheckpointError,
    complete_checkpoints,
    load_checkpoint_files,
    verify_checkpoint,
)
from lmcompose.train.recipe import TrainingDivergedError, train
from lmcompose.train.run_log import read_metrics

from helpers import composition_weights as weights
from helpers import reverse_task, save_bases, tiny_pair, write_jsonl
from helpers import train_config as config

FORK = multiprocessing.get_context("fork")


pytestmark = pytest.mark.usefixtures("one_thread")


def composed(seed=0):
    torch.manual_seed(seed)  # the connections' initial weights: the same in every process of a test
    return ComposedModel(*tiny_pair())


def assert_every_checkpoint_loads(run):
    """Every step-N directory reads completely and loads onto the bases; so does composition/ when present."""
    found = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] if (run / "checkpoints").exists() else []
    assert [p for p in found if p not in complete_checkpoints(run / "checkpoints")] == [], "a step-N that is not complete"
    for path in found:
        verify_checkpoint(path)
        ComposedModel.from_composition(path, *tiny_pair())
    if (run / "composition").exists():
        ComposedModel.from_composition(run / "composition", *tiny_pair())
    return found


# ----------------------------------------------------------------- SIGKILL at any moment


def _child_train(run, data, cfg, kill_point):
    """In a forked child: resume the run (or start it); with kill_point, SIGKILL itself at that point."""
    import lmcompose.io.composition_files as checkpoint_module
    import lmcompose.train.checkpoints as state_module

    torch.set_num_threads(1)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def on_call(module, name, nth, action):
        original, calls = getattr(module, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if action(calls[0], nth, args):
                die()
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    if kill_point == "writing the scheduler state of the 3rd checkpoint":  # mid-write of the temporary directory
        on_call(state_module, "atomic_write", 3, lambda n, nth, a: str(a[0]).endswith("scheduler.pt") and n >= 7)
    elif kill_point == "after publishing a checkpoint, before deleting the oldest":
        on_call(state_module, "remove_directory", 2, lambda n, nth, a: n == nth)
    elif kill_point == "halfway through deleting the oldest checkpoint":
        def half_delete(n, nth, args):
            path = Path(args[0])
            if ".old-" in path.name and n >= nth:
                next(p for p in path.iterdir() if p.is_file()).unlink()  # some files gone, then the kill
                return True
            return False

        on_call(state_module.shutil, "rmtree", 3, half_delete)
    elif kill_point == "writing the final composition":
        on_call(checkpoint_module, "atomic_write_text", 1,
                lambda n, nth, a: ".composition.tmp-" in str(a[0]))
    train(composed(), data, None, cfg, run, resume=True)


def test_sigkill_at_random_moments_and_during_checkpoint_writes_loses_nothing(tmp_path, data):
    cfg = config(max_steps=30, save_every=1, keep_last=2, gradient_accumulation_steps=2, warmup_steps=2)
    started = time.perf_counter()
    straight = composed()
    train(straight, data, None, cfg, tmp_path / "straight")
    duration = time.perf_counter() - started

    run = tmp_path / "killed"
    rng = random.Random(8)
    deterministic = ["writing the scheduler state of the 3rd checkpoint",
                     "after publishing a checkpoint, before deleting the oldest",
                     "halfway through deleting the oldest checkpoint"]
    delay = lambda: rng.uniform(0.03, 0.15) * duration  # noqa: E731  (a few steps of a resumed run)
    kills = [(deterministic[0], None), ("random", delay()), (deterministic[1], None), (deterministic[2], None),
             ("random", delay()), ("random", delay()), ("writing the final composition", None)]
    killed, progress = [], []  # which kills landed; (kill, the newest checkpoint after it)
    for point, delay in kills:
        child = FORK.Process(target=_child_train, args=(run, data, cfg, None if delay else point))
        child.start()
        if delay is not None:
            child.join(delay)
            if child.exitcode is None:
                os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode in (0, -signal.SIGKILL), f"{point}: exit code {child.exitcode}"
        found = assert_every_checkpoint_loads(run)
        if child.exitcode == -signal.SIGKILL:
            killed.append(point)
            progress.append((point, max((int(p.name.split("-")[1]) for p in found), default=0)))
    assert [k for k in killed if k != "random"] == deterministic + ["writing the final composition"], killed
    assert len(killed) >= 5, killed  # and most random moments fall before the run's end
    assert any(point == "random" and 0 < step < 30 for point, step in progress), progress  # mid-run
    assert [step for _, step in progress] == sorted(step for _, step in progress), progress  # never lost a step

    resumed = composed(seed=99)  # other initial weights: everything must come from the checkpoint
    result = train(resumed, data, None, cfg, run, resume=True)
    assert result.step == 30
    for key, value in weights(straight).items():
        assert torch.equal(resumed.composition_state_dict()[key], value), key
    assert_every_checkpoint_loads(run)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # the temporary and half-deleted directories were cleaned up
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 31))


def test_resume_skips_a_damaged_newest_checkpoint_and_refuses_unsafe_pickles(tmp_path, data, caplog):
    cfg = config(max_steps=4, save_every=1, keep_last=4)
    train(composed(), data, None, cfg, tmp_path)
    newest = tmp_path / "checkpoints" / "step-4"
    (newest / OPTIMIZER_NAME).write_bytes((newest / OPTIMIZER_NAME).read_bytes()[:100])  # truncated
    with pytest.raises(DamagedCheckpointError, match=r"optimizer\.pt does not have the sha256 trainer_state\.json "
                                                     "records"):
        load_checkpoint_files(newest)
    state = json.loads((newest / STATE_NAME).read_text())
    (newest / STATE_NAME).write_text(json.dumps({k: v for k, v in state.items() if k not in ("sha256", "state_sha256")}))  # no digests
    with pytest.raises(DamagedCheckpointError, match=r"optimizer\.pt cannot be read .* the file is damaged"):
        load_checkpoint_files(newest)

    class Payload:  # what a malicious rng_state.pt could hold: a call run by unpickling
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "pwned"),))

    step3 = tmp_path / "checkpoints" / "step-3"
    (step3 / RNG_NAME).write_bytes(pickle.dumps({"python": Payload()}))
    with pytest.raises(DamagedCheckpointError, match=r"rng_state\.pt does not have the sha256"):  # never unpickled
        load_checkpoint_files(step3)
    state = json.loads((step3 / STATE_NAME).read_text())  # a checkpoint of an older lmcompose, without digests:
    (step3 / STATE_NAME).write_text(json.dumps({k: v for k, v in state.items() if k not in ("sha256", "state_sha256")}))
    with pytest.raises(DamagedCheckpointError, match=r"rng_state\.pt is refused: .* only weights-only files"):
        load_checkpoint_files(step3)  # the weights-only unpickler refuses it
    assert not (tmp_path / "pwned").exists()

    shutil.rmtree(tmp_path / "composition")
    with caplog.at_level("WARNING", logger="lmcompose.train"):
        result = train(composed(), data, None, cfg, tmp_path, resume=True)
    assert result.resumed_from.name == "step-2" and result.step == 4
    assert "skipping checkpoint" in caplog.text and "step-4" in caplog.text and "step-3" in caplog.text
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("bad,accumulation,micro_batch,step", [("nan", 1, 5, 5), ("inf", 2, 5, 3)])
def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path, data, bad, accumulation, micro_batch, step
):
    model = composed()
    calls = [0]
    forward = model.forward

    def poisoned(*args, **kwargs):  # micro-batch `micro_batch` (1-based) gets non-finite logits, so a non-finite loss
        out = forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] == micro_batch:
            out.logits = out.logits * float(bad)
        return out

    model.forward = poisoned
    cfg = config(max_steps=8, save_every=2, keep_last=5, gradient_accumulation_steps=accumulation)
    with pytest.raises(TrainingDivergedError, match=rf"NaN or infinite at step {step} .*last good checkpoint is \S*step-{step - 1 - (step - 1) % 2}") as err:
        train(model, data, None, cfg, tmp_path)
    last = tmp_path / "checkpoints" / f"step-{step - 1 - (step - 1) % 2}"
    assert err.value.step == step and err.value.last_checkpoint == last
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")][-1] == last.name
    assert not (tmp_path / "composition").exists()
    current = model.composition_state_dict()
    assert all(torch.isfinite(v).all() for v in current.values())  # the poisoned step was not applied
    if step - 1 == int(last.name.split("-")[1]):
        saved = ComposedModel.from_composition(last, *tiny_pair()).composition_state_dict()
        assert all(torch.equal(saved[k], v) for k, v in current.items())
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1] == {"kind": "diverged", "step": step, "epoch": records[-1]["epoch"]}
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, step))


# ----------------------------------------------------------------- signals


@pytest.fixture(scope="module")
def cli_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_cli")
    anchor, augment = save_bases(root)
    return {"root": root, "anchor": str(anchor), "augment": str(augment),
            "train": str(write_jsonl(root / "train.jsonl", reverse_task(24, seed=0)))}


def cli_args(work, output, *extra):
    return ["train", "--anchor", work["anchor"], "--augment", work["augment"], "--data", work["train"],
            "--output", str(output), "--batch-size", "4", "--lr", "1e-2", "--seed", "3", "--no-progress", "--cpu",
            "--log-every", "1", *extra]


def wait_for_step(run, step, proc_alive, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc_alive():
        steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
        if steps and steps[-1] >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step}")


def test_sigterm_writes_a_checkpoint_and_exits_143(cli_work, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "lmcompose", *cli_args(cli_work, run, "--max-steps", "500")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run, 2, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    last = run / "checkpoints" / f"step-{steps[-1]}"
    assert f"SIGTERM at step {steps[-1]}: checkpoint written to {last}; continue with --resume" in err
    assert "Traceback" not in err
    assert complete_checkpoints(run / "checkpoints") == [last]  # written although --save-every was not given
    assert json.loads((last / "trainer_state.json").read_text())["step"] == steps[-1]
    assert_every_checkpoint_loads(run)
    assert not (run / "composition").exists()
    assert read_metrics(run / "metrics.jsonl")[-1] == {"kind": "interrupted", "step": steps[-1], "signal": "SIGTERM"}


def _child_main(argv):
    torch.set_num_threads(1)
    os._exit(main(argv))


def test_sigint_stops_after_the_step_and_the_resumed_run_ends_with_the_uninterrupted_weights(cli_work, tmp_path):
    extra = ("--max-steps", "30", "--grad-accum", "2", "--warmup-steps", "3")
    run = tmp_path / "run"
    child = FORK.Process(target=_child_main, args=(cli_args(cli_work, run, *extra),))
    child.start()
    wait_for_step(run, 3, child.is_alive)
    os.kill(child.pid, signal.SIGINT)
    child.join(60)
    assert child.exitcode == 128 + signal.SIGINT
    stopped = complete_checkpoints(run / "checkpoints")
    assert len(stopped) == 1 and not (run / "composition").exists()
    assert 3 <= int(stopped[0].name.split("-")[1]) < 30

    assert main(cli_args(cli_work, run, *extra, "--resume")) == 0
    assert main(cli_args(cli_work, tmp_path / "straight", *extra)) == 0
    anchor_and_augment = tiny_pair()
    resumed = ComposedModel.from_composition(run / "composition", *anchor_and_augment).composition_state_dict()
    straight = ComposedModel.from_composition(tmp_path / "straight" / "composition", *anchor_and_augment)
    for key, value in straight.composition_state_dict().items():
        assert torch.equal(resumed[key], value), key


def test_a_diverged_cli_run_exits_1_naming_the_step(cli_work, tmp_path, monkeypatch, capsys):
    calls = [0]
    forward = ComposedModel.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 4:
            out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(ComposedModel, "forward", poisoned)
    assert main(cli_args(cli_work, tmp_path / "run", "--max-steps", "6", "--save-every", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmcompose train: error: Training stopped: the loss or gradient norm became NaN or infinite "
                          "at step 4 (epoch 0)")
    assert "step-2: resume from it (--resume)" in err


# ----------------------------------------------------------------- bad input before any work


def test_examples_longer_than_the_context_are_refused_naming_file_and_line(tmp_path, tok, monkeypatch):
    from lmcompose.io.datasets import load_dataset
    from lmcompose.testing import tiny_causal_lm

    from helpers import VOCAB

    rows = [{"text": "ab"}, {"text": "abc " * 3}, {"text": "a"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    short = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_positions=8)
    model = ComposedModel(short, tiny_pair()[1])
    dataset = load_dataset(path, tok)
    with pytest.raises(DataError, match=r"long\.jsonl, line 2: the example has 14 tokens but the anchor reads at most 8 "
                                        r"\(config\.max_position_embeddings\); 1 example\(s\) are longer\. Truncate them "
                                        r"with --max-length 8"):
        train(model, dataset, None, config(max_steps=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(DataError, match=r"the training data, example 0: the example has 9 tokens but the augment"):
        gpt2 = tiny_causal_lm("gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, max_positions=8)
        train(ComposedModel(tiny_pair()[0], gpt2), TokenizedDataset.from_token_ids([list(range(4, 13))]), None,
              config(max_steps=1), tmp_path / "run")


def test_cli_refuses_a_too_long_generation_and_bad_augment_tokenizer_flags(cli_work, tmp_path, capsys):
    base = ["--anchor", cli_work["anchor"], "--augment", cli_work["augment"]]
    assert main(["generate", *base, "--no-composition", "--prompt", "rev ab =>", "--max-new-tokens", "600"]) == 2
    err = capsys.readouterr().err
    assert "--prompt (10 tokens) plus --max-new-tokens 600 exceeds the 512 positions the anchor reads" in err

    train = ["train", *base, "--data", cli_work["train"], "--output", str(tmp_path / "o")]
    assert main([*train, "--augment-tokenizer", cli_work["augment"], "--augment-tokenizer", cli_work["augment"]]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lmcompose train: error: --augment-tokenizer was given 2 times for 1 --augment model(s); give at most one "
        "per --augment, in the same order")
    assert main([*train, "--augment-tokenizer", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lmcompose train: error: --augment-tokenizer: No tokenizer at {tmp_path / 'nowhere'}: the path does not exist")
    assert not (tmp_path / "o").exists()


def test_trust_remote_code_is_off_unless_the_flag_is_given(monkeypatch, tmp_path):
    import lmcompose.cli as cli
    import lmcompose.io.bases as models

    seen = []

    def fake_load_base(path, dtype=None, trust_remote_code=False, with_tokenizer=True):
        seen.append(trust_remote_code)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(models, "load_base", fake_load_base)
    argv = ["generate", "--anchor", "a", "--augment", "b", "--no-composition", "--prompt", "x"]
    assert cli.main(argv) == 2 and cli.main(argv + ["--trust-remote-code"]) == 2
    assert seen == [False, True]


def test_composition_json_that_disagrees_with_its_weights_is_refused(tmp_path):
    model = composed()
    model.save_composition(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    key = next(iter(meta["tensors"]))
    meta["tensors"][key] = [n + 1 for n in meta["tensors"][key]]
    (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"composition_config\.json is not the one .*composition\.safetensors was saved "
                                         r"with"):
        ComposedModel.from_composition(tmp_path / "c", *tiny_pair())
    meta["augments"] = {"model_type": "llama"}
    (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'augments' must be a non-empty list of base-model fingerprints"):
        ComposedModel.from_composition(tmp_path / "c", *tiny_pair())


def test_jsonl_bytes_that_are_not_text_are_named_by_file_and_line(tmp_path):
    from lmcompose.io.jsonl import read_jsonl

    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match=r"folder\.jsonl: no such data file \(it is a directory\)"):
        read_jsonl(tmp_path / "folder.jsonl")
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\n')  # BOM, Windows line ends, a blank line
    records = read_jsonl(path)
    assert records.rows == [{"text": "a"}, {"text": "b"}] and records.lines == [1, 3]
    path.write_bytes(b'{"text": "a"}\n{"text": "b\xff"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl, line 2: not UTF-8 text \(byte 0xff at column 12\)"):
        read_jsonl(path)
    path.write_bytes(b'{"text": "a"}\n{"text": "\\ud800"}\n')
    with pytest.raises(DataError, match=r'x\.jsonl, line 2: "text" holds an unpaired surrogate escape'):
        read_jsonl(path)
    path.write_bytes(b'{"text": "a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(DataError, match=r"x\.jsonl, line 2: the JSON is nested too deeply to read"):
        read_jsonl(path)


def test_resume_refuses_a_checkpoint_written_by_another_number_of_processes(tmp_path, data):
    cfg = config(max_steps=2, save_every=1)
    train(composed(), data, None, cfg, tmp_path)
    state_file = tmp_path / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    from lmcompose.train.checkpoints import _state_digest

    state = dict(state, num_processes=2)
    state_file.write_text(json.dumps(dict(state, state_sha256=_state_digest(state))))  # as a 2-process run writes it
    with pytest.raises(ValueError, match=r"step-2: it was written by a run on 2 process\(es\), this one has 1"):
        train(composed(), data, None, cfg, tmp_path, resume=True)
