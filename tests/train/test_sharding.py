"""Sharded training under torchrun (2 CPU ranks, gloo; torch FSDP2 and DeepSpeed ZeRO-3): each rank holds half of
the frozen bases, the composition equals one process's on the same global batch, a SIGKILLed rank's run resumes to
the uninterrupted weights, and what cannot be a sharded run is refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmcompose.cli import main
from lmcompose.io.composition_files import WEIGHTS_NAME
from lmcompose.train.run_log import read_metrics

from helpers import reverse_task, save_bases, write_jsonl
from test_distributed import free_port

HERE = Path(__file__).parent
ROOT = HERE.parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    anchor, augment = save_bases(root)
    data = write_jsonl(root / "train.jsonl", reverse_task(16, seed=0))  # completions of 2 to 5 characters
    # the augment's block 3 is above every connection: its forward stops after block 2 (the early exit), sharded too
    common = ["train", "--anchor", str(anchor), "--augment", str(augment), "--data", str(data), "--lr", "1e-2",
              "--connections", "1:0,2:1",
              "--seed", "3", "--max-steps", "6", "--save-every", "2", "--keep-last", "5", "--log-every", "1",
              "--warmup-steps", "2", "--no-progress", "--cpu"]
    return {"root": root, "common": common}


def torchrun(work, output, *extra, report="reports", kill_after=None, empty_on_rank_1=False):
    """`lmcompose train` on 2 ranks under torchrun (batch 2 per rank), through the spy script."""
    reports = work["root"] / report
    reports.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    ours = ["--kill-after-step", str(kill_after)] if kill_after is not None else []
    ours += ["--empty-on-rank-1"] if empty_on_rank_1 else []
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(HERE / "sharded_train.py"), str(reports), *ours, "--", *work["common"], "--batch-size", "2",
               "--output", str(output), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300), reports


def weights(run):
    return load_file(run / "composition" / WEIGHTS_NAME)


def assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(b[key], value, atol=atol, rtol=0), (key, (b[key] - value).abs().max())


@pytest.fixture(scope="module")
def one_process_run(work):
    out = work["root"] / "one"
    assert main(work["common"] + ["--batch-size", "4", "--output", str(out)]) == 0
    return out


def train_losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def optimizer_state(run, step):
    return torch.load(run / "checkpoints" / f"step-{step}" / "optimizer.pt", weights_only=True)  # plain tensors only


@pytest.fixture(scope="module")
def sharded_run(work):
    proc, reports = torchrun(work, work["root"] / "fsdp", "--sharding", "fsdp2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work["root"] / "fsdp", reports, proc


def test_two_sharded_ranks_equal_one_process_on_the_same_global_batch_and_hold_half_the_bases(work, sharded_run,
                                                                                              one_process_run):
    run, reports, proc = sharded_run
    assert_close(weights(one_process_run), weights(run))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights(run).items() if ".out." in k)  # it trained
    assert train_losses(run) == pytest.approx(train_losses(one_process_run), rel=1e-5)
    assert proc.stdout.count("trained 6 steps") == 1  # rank 0 alone reports and writes

    for rank in (0, 1):
        report = json.loads((reports / f"rank{rank}.json").read_text())
        assert report["exit_code"] == 0 and report["connection_params_sharded"]
        runs = report["augment_blocks_run"]  # the early exit: block 3 never runs, blocks 0-2 once per micro-batch
        assert runs[3] == 0 and runs[0] == runs[1] == runs[2] > 0, runs
        # each rank keeps its half of every base tensor between uses (an odd row count splits unevenly); rank 1
        # built the bases empty (no weight read) and received its halves from rank 0
        assert 0.45 < report["bases_bytes_after"] / report["whole_bytes"] < 0.55, report
        assert report["bases_empty_before"] == (rank == 1)
        held = report["bases_bytes_before"] / report["whole_bytes"]  # rank 1: only the rotary tables it computed
        assert (held < 0.01) if rank == 1 else (held == 1), report
    # the checkpoints hold full tensors, as one process writes them
    saved = load_file(run / "checkpoints" / "step-6" / WEIGHTS_NAME)
    assert_close(weights(run), {k: v for k, v in saved.items()}, atol=0)
    moments = sorted(tuple(v["exp_avg"].shape) for v in optimizer_state(run, 6)["state"].values())
    assert moments == sorted(tuple(v.shape) for v in saved.values())  # whole, not one rank's half


def test_a_sigkilled_rank_then_resume_gives_the_uninterrupted_weights_and_another_sharding_is_refused(work, sharded_run):
    run = work["root"] / "killed"
    proc, _ = torchrun(work, run, "--sharding", "fsdp2", report="killed-reports", kill_after=3)
    assert proc.returncode != 0  # torchrun stops the launch when a rank dies
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # step 3's work is lost, no more

    proc, _ = torchrun(work, run, "--resume", report="wrong-reports")  # resumed data-parallel, not sharded
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmcompose train: error:")]
    # each rank refuses and exits 2, unless torchrun stopped it first when the other one did (torchrun exits 1)
    assert errors and all(line.endswith("(checkpoint != now): sharding: 'fsdp2' != 'none'") for line in errors)
    assert "exitcode  : 2" in proc.stderr
    assert str(ROOT / "src") not in proc.stderr  # no traceback of ours
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # nothing written was lost

    proc, _ = torchrun(work, run, "--sharding", "fsdp2", "--resume", report="resumed-reports")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(weights(sharded_run[0]), weights(run))
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def zero3_run(work):
    proc, reports = torchrun(work, work["root"] / "zero3", "--sharding", "zero3", report="zero3-reports")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work["root"] / "zero3", reports, proc


def test_deepspeed_zero3_ranks_equal_one_process_and_hold_half_the_bases(work, zero3_run, one_process_run):
    run, reports, proc = zero3_run
    assert_close(weights(one_process_run), weights(run))
    assert train_losses(run) == pytest.approx(train_losses(one_process_run), rel=1e-5)
    assert proc.stdout.count("trained 6 steps") == 1
    assert "is deprecated" not in proc.stderr, proc.stderr[-3000:]  # DeepSpeed's calls of deprecated collectives
    for rank in (0, 1):
        report = json.loads((reports / f"rank{rank}.json").read_text())
        assert report["exit_code"] == 0 and report["connection_params_sharded"]
        runs = report["augment_blocks_run"]  # the early exit under ZeRO-3's gathering: block 3 never runs
        assert runs[3] == 0 and runs[0] == runs[1] == runs[2] > 0, runs
        assert report["bases_bytes_before"] == report["whole_bytes"]  # every rank loads the bases whole ...
        assert 0.45 < report["bases_bytes_after"] / report["whole_bytes"] < 0.55, report  # ... and keeps half
    # the checkpoint holds what one process's holds: the composition and AdamW's moments, full tensors
    assert_close(load_file(one_process_run / "checkpoints" / "step-4" / WEIGHTS_NAME),
                 load_file(run / "checkpoints" / "step-4" / WEIGHTS_NAME))
    one, zero = optimizer_state(one_process_run, 4), optimizer_state(run, 4)
    assert one["state"].keys() == zero["state"].keys() and one["param_groups"] == zero["param_groups"]
    for index, moments in one["state"].items():
        assert moments["step"] == zero["state"][index]["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(moments[key], zero["state"][index][key], atol=1e-6, rtol=1e-4), (index, key)


def test_a_sigkilled_zero3_rank_then_resume_gives_the_uninterrupted_weights(work, zero3_run):
    run = work["root"] / "zero3-killed"
    proc, _ = torchrun(work, run, "--sharding", "zero3", report="zero3-killed-reports", kill_after=3)
    assert proc.returncode != 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    proc, _ = torchrun(work, run, "--sharding", "zero3", "--resume", report="zero3-resumed-reports")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(weights(zero3_run[0]), weights(run))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_sharding_on_one_process_and_with_what_it_cannot_carry_is_refused_before_anything_is_written(work, capsys):
    out = work["root"] / "refused"
    for extra, message in (
        (["--sharding", "fsdp2"], "sharding='fsdp2' (--sharding fsdp2) splits the frozen bases across processes, and "
                                  "this launch has one: start it with `torchrun --nproc_per_node N`"),
        (["--sharding", "fsdp2", "--bf16"], "sharding='fsdp2' trains in float32: drop --bf16"),
        (["--sharding", "fsdp2", "--cache-augment-states"], "drop --cache-augment-states"),
        (["--sharding", "fsdp2", "--cache-anchor-states"], "drop --cache-anchor-states"),
        (["--sharding", "zero3"], "sharding='zero3' (--sharding zero3) splits the frozen bases across processes"),
        (["--sharding", "zero3", "--bf16"], "sharding='zero3' trains in float32: drop --bf16"),
    ):
        env = {"WORLD_SIZE": "2"} if len(extra) > 2 else {}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)  # two processes as torchrun would say, so the next check speaks
            assert main(work["common"] + ["--batch-size", "2", "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err  # refused before any model loads: nothing else printed
    assert not out.exists()


def test_zero3_is_refused_in_one_line_without_deepspeed_and_with_bases_built_empty(work, capsys, monkeypatch):
    from lmcompose import ComposedModel, CompositionConfig
    from lmcompose.io.bases import load_base
    from lmcompose.train import zero3
    from lmcompose.train.config import TrainingConfig

    out = work["root"] / "refused-zero3"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "deepspeed", None)  # as if not installed: importing it raises ImportError
        patch.setenv("WORLD_SIZE", "2")
        assert main(work["common"] + ["--batch-size", "2", "--output", str(out), "--sharding", "zero3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trains through DeepSpeed, which is not installed: pip install deepspeed" in err[0], err
    assert not out.exists()

    bases = [load_base(work["root"] / name, with_tokenizer=False, empty=True)[0] for name in ("anchor", "augment")]
    model = ComposedModel(*bases, CompositionConfig(connections=[(1, 0)]))
    optimizer = torch.optim.AdamW(model.composition_parameters())
    with pytest.raises(ValueError, match=r"this rank built them empty \(load_base\(empty=True\)\): load them whole"):
        zero3.initialize(model, optimizer, TrainingConfig(sharding="zero3"))


def test_zero3_with_one_rank_built_empty_is_refused_by_every_rank(work):
    # ZeRO-3 partitions what each rank loaded: a rank with empty bases is refused on every rank, so none is left
    # waiting in a collective for the refused one
    out = work["root"] / "zero3-empty"
    result, reports = torchrun(work, out, "--sharding", "zero3", report="reports-zero3-empty", empty_on_rank_1=True)
    assert result.returncode != 0
    message = "sharding='zero3' partitions the bases each rank loaded, and rank(s) 1 built them empty"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((reports / f"rank{rank}.json").read_text())
        assert report["exit_code"] == 2 and "bases_bytes_after" not in report  # refused before partitioning
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
