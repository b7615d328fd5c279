"""Data-parallel training under `accelerate launch` (2 CPU processes, gloo) equals one process with twice the
gradient accumulation and one process with the whole batch, on the same data: same global batch, same weights."""

import json
import os
import shutil
import socket
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

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command():
    script = Path(sys.executable).parent / "accelerate"
    return [str(script)] if script.exists() else [shutil.which("accelerate") or "accelerate"]


@pytest.mark.parametrize("anchor_cache", [False, True], ids=["plain", "anchor-state-cache"])
def test_two_processes_equal_one_with_doubled_accumulation_and_one_with_the_whole_batch(tmp_path, anchor_cache):
    anchor, augment = save_bases(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", reverse_task(16, seed=0))  # 8 batches of 2: 4 per rank
    common = ["train", "--anchor", str(anchor), "--augment", str(augment), "--data", str(data), "--batch-size", "2",
              "--lr", "1e-2", "--seed", "3", "--max-steps", "6", "--save-every", "3", "--log-every", "1",
              "--warmup-steps", "2", "--no-progress", "--cpu"]
    if anchor_cache:  # every rank replays the anchor's block 1 below the connection at anchor layer 1
        common += ["--connections", "1:1,3:1", "--cache-anchor-states"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    # accelerate 1.x starts ONE process for `launch --cpu --num_processes 2` (its CPU launcher needs mpirun);
    # the example config uses the torchrun launcher, and lmcompose's --cpu makes each process a gloo CPU rank.
    launch = accelerate_command() + ["launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp_cpu.yaml"),
                                     "--num_processes", "2", "--main_process_port", str(free_port())]
    two = tmp_path / "two"
    reports = tmp_path / "reports"
    reports.mkdir()
    proc = subprocess.run(launch + [str(HERE / "distributed_train.py"), str(reports), "--", *common,
                                    "--output", str(two), "--grad-accum", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(common + ["--output", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    # completions of 2 to 5 characters: the step's loss is divided by its target tokens over every micro-batch and
    # rank, so the whole batch of 4 in one micro-batch equals both splits of it
    whole = common[:common.index("--batch-size")] + ["--batch-size", "4"] + common[common.index("--batch-size") + 2:]
    assert main(whole + ["--output", str(tmp_path / "whole"), "--grad-accum", "1"]) == 0

    one_weights = load_file(tmp_path / "one" / "composition" / WEIGHTS_NAME)
    for other in (two, tmp_path / "whole"):
        other_weights = load_file(other / "composition" / WEIGHTS_NAME)
        assert one_weights.keys() == other_weights.keys()
        for key, value in one_weights.items():  # equal up to the order of float additions
            assert torch.allclose(other_weights[key], value, atol=1e-5, rtol=0), (
                other.name, key, (other_weights[key] - value).abs().max())
        print(other.name, "largest difference:", max(float((other_weights[k] - v).abs().max())
                                                      for k, v in one_weights.items()))
    two_weights = load_file(two / "composition" / WEIGHTS_NAME)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in two_weights.items() if ".out." in k)  # it trained

    # DDP synchronises the connections only: the frozen bases are neither bucketed nor broadcast
    for rank in (0, 1):
        report = json.loads((reports / f"rank{rank}.json").read_text())
        assert report["wrapper"] == "DistributedDataParallel" and report["num_processes"] == 2
        assert sorted(report["synced"]) == report["composition"] and report["synced_require_grad"]
        assert report["find_unused_parameters"] is False and not report["attribute_left_on_model"]
        assert report["exit_code"] == 0

    # rank 0 alone wrote the run: one record per step, the global mean loss, the same losses as one process
    records = read_metrics(two / "metrics.jsonl")
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    one_losses = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"]
    two_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert proc.stdout.count("trained 6 steps") == 1
