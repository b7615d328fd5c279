import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmcompose import ComposedModel
from lmcompose.cli import build_parser, main, parse_options
from lmcompose.core.tokens import encode_prompt
from lmcompose.io.bases import load_base
from lmcompose.io.composition_files import CONFIG_NAME, WEIGHTS_NAME
from lmcompose.model.completion import decode_new_tokens
from lmcompose.train.checkpoints import latest_checkpoint
from lmcompose.train.evaluation import chrf

from helpers import reverse_task, save_bases, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    anchor, augment = save_bases(root)
    return {
        "root": root,
        "anchor": str(anchor),
        "augment": str(augment),
        "train": str(write_jsonl(root / "train.jsonl", reverse_task(24, seed=0))),
        "dev": str(write_jsonl(root / "dev.jsonl", reverse_task(4, seed=1))),
    }


def bases(work):
    return ["--anchor", work["anchor"], "--augment", work["augment"]]


def train_args(work, output, *extra):
    return ["train", *bases(work), "--data", work["train"], "--output", str(output), "--batch-size", "4",
            "--lr", "1e-2", "--seed", "3", "--no-progress", "--cpu", *extra]


@pytest.fixture(scope="module")
def trained(work):
    output = work["root"] / "run"
    assert main(train_args(work, output, "--eval-data", work["dev"], "--max-steps", "6", "--save-every", "3",
                           "--connections", "3:1", "--cache-augment-states")) == 0
    return output


def loaded(work, composition=None):
    anchor, tokenizer = load_base(work["anchor"])
    augment, _ = load_base(work["augment"])
    if composition is None:
        return ComposedModel(anchor, augment), tokenizer
    return ComposedModel.from_composition(composition, anchor, augment), tokenizer


def greedy(model, tokenizer, prompt, max_new_tokens):
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return decode_new_tokens(tokenizer, out[0, ids.shape[1]:].tolist())


def token_loss(model, tokenizer, records):
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt = encode_prompt(tokenizer, r["prompt"])
            completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + completion])
            labels = torch.tensor([[-100] * len(prompt) + completion])
            total += model(ids, labels=labels).loss.item() * len(completion)
            count += len(completion)
    return total / count


def test_train_writes_a_small_composition_and_the_run(trained, work):
    composition = trained / "composition"
    assert set(os.listdir(composition)) == {CONFIG_NAME, WEIGHTS_NAME}
    size = sum(f.stat().st_size for f in composition.iterdir())
    base_size = sum(f.stat().st_size for f in Path(work["anchor"]).iterdir())
    assert size < 1_000_000 and size < base_size / 4
    assert json.loads((composition / CONFIG_NAME).read_text())["connections"] == [[[3, 1]]]
    assert sorted(os.listdir(trained / "checkpoints")) == ["step-3", "step-6"]
    assert (trained / "loss.png").is_file()
    assert (trained / "augment_cache" / "train" / "manifest.json").is_file()  # --cache-augment-states
    kinds = [json.loads(line)["kind"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("eval") == 1 and "train" in kinds


def test_eval_reproduces_the_in_process_metrics(trained, work, capsys):
    model, tokenizer = loaded(work, trained / "composition")
    prompts = [r["prompt"] for r in reverse_task(6, seed=5)]
    own = [greedy(model, tokenizer, p, 6) for p in prompts]
    # four references are the composition's own greedy completions, two are not
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts[:4], own[:4])]
    records += [{"prompt": p, "completion": "zz" + c} for p, c in zip(prompts[4:], own[4:])]
    data = write_jsonl(work["root"] / "test.jsonl", records)
    out = work["root"] / "eval.json"
    args = ["eval", *bases(work), "--composition", str(trained / "composition"), "--data", str(data),
            "--max-new-tokens", "6", "--output", str(out), "--batch-size", "4"]
    capsys.readouterr()
    assert main(args) == 0
    table = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["loss"] == pytest.approx(token_loss(model, tokenizer, records), rel=1e-5)
    assert metrics["exact_match"] == pytest.approx(4 / 6)
    assert metrics["completions"] == own
    assert metrics["chrf"] == pytest.approx(chrf(own, [r["completion"] for r in records]))
    for name in ("loss", "perplexity", "exact_match", "chrf"):
        assert name in table

    assert main(["eval", *bases(work), "--no-composition", "--data", str(data), "--output", str(out), "--no-generate"]) == 0
    anchor_only = json.loads(out.read_text())
    with model.disable_composition():
        assert anchor_only["loss"] == pytest.approx(token_loss(model, tokenizer, records), rel=1e-5)
    assert "exact_match" not in anchor_only


def test_generate_streams_the_in_process_greedy_completion(trained, work, capsys):
    model, tokenizer = loaded(work, trained / "composition")
    expected = greedy(model, tokenizer, "rev abc =>", 8)
    capsys.readouterr()
    args = ["generate", *bases(work), "--composition", str(trained / "composition"), "--prompt", "rev abc =>",
            "--max-new-tokens", "8"]
    assert main(args) == 0
    assert capsys.readouterr().out == expected + "\n"
    sampled = [args + ["--do-sample", "--temperature", "1.5", "--seed", "7"]] * 2
    outputs = []
    for a in sampled:
        assert main(a) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # seeded sampling is reproducible


def test_config_file_with_flags_overriding_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "anchor: a\naugment: [b, c]\ndata: d.jsonl\noutput: out\nlearning_rate_is_not_a_flag: 1\n"
    )
    with pytest.raises(Exception, match="unknown option 'learning_rate_is_not_a_flag'"):
        parse_options(["train", "--config", str(config)])
    config.write_text(
        "anchor: a\naugment: [b, c]\ndata: d.jsonl\noutput: out\nlr: 1e-3\nbatch-size: 3\nmax_steps: 10\n"
        "cache_augment_states: true\nconnections: '3:1,7:5'\n"
    )
    _, opts = parse_options(["train", "--config", str(config)])
    assert (opts.lr, opts.batch_size, opts.max_steps, opts.epochs) == (1e-3, 3, 10, None)
    assert opts.augment == ["b", "c"] and opts.connections == [[3, 1], [7, 5]] and opts.cache_augment_states
    assert opts.seed == 0 and opts.max_length == 512  # defaults fill the rest
    _, opts = parse_options(
        ["train", "--config", str(config), "--lr", "0.5", "--epochs", "2", "--augment", "x", "--no-cache-augment-states"]
    )
    assert (opts.lr, opts.batch_size, opts.max_steps, opts.epochs) == (0.5, 3, None, 2)
    assert opts.augment == ["x"] and opts.cache_augment_states is False


def test_help_explains_every_flag(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
            assert all(s in text for s in action.option_strings)


@pytest.mark.parametrize(
    "case,message",
    [
        ("bad_jsonl", r"bad\.jsonl, line 2: not valid JSON"),
        ("no_anchor", r"--anchor: No model at \S*nowhere: the path does not exist"),
        ("bad_connections", r"argument --connections: Bad connection '3-1'"),
        ("out_of_range", r"augment layer 9 is out of range; valid augment layers are 0\.\.3"),
        ("missing_data", r"--data is required"),
        ("bad_yaml_value", r"option 'batch_size': must be a positive integer, got -1"),
        ("other_bases", r"--composition: The composition at \S+ was made for other base models"),
    ],
)
def test_bad_input_exits_2_with_one_line(work, trained, tmp_path, capsys, case, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", reverse_task(1))
    with open(bad, "a") as f:
        f.write('{"prompt": \n')
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: -1\n")
    base = ["train", *bases(work), "--output", str(tmp_path / "o"), "--no-progress"]
    argv = {
        "bad_jsonl": base + ["--data", str(bad)],
        "no_anchor": ["train", "--anchor", str(tmp_path / "nowhere"), "--augment", work["augment"], "--data", str(bad),
                      "--output", str(tmp_path / "o")],
        "bad_connections": base + ["--data", work["train"], "--connections", "3-1"],
        "out_of_range": base + ["--data", work["train"], "--connections", "9:0"],
        "missing_data": base,
        "bad_yaml_value": base + ["--data", work["train"], "--config", str(config)],
        "other_bases": ["eval", "--anchor", work["augment"], "--augment", work["anchor"], "--data", work["dev"],
                        "--composition", str(trained / "composition")],
    }[case]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert err.startswith(f"lmcompose {argv[0]}: error: ")


def test_training_killed_mid_run_resumes_to_the_uninterrupted_weights(work, tmp_path):
    extra = ("--max-steps", "20", "--save-every", "1", "--keep-last", "3", "--grad-accum", "2", "--warmup-steps", "3")
    run = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lmcompose", *train_args(work, run, *extra)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while latest_checkpoint(run / "checkpoints") is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = latest_checkpoint(run / "checkpoints")
    assert killed_at is not None, (tmp_path / "log.txt").read_text()
    assert not (run / "composition").exists(), "the run finished before it was killed"

    # resume from the file the first run recorded, as a user would
    assert main(["train", "--config", str(run / "train_args.yaml"), "--resume", "--no-progress"]) == 0
    assert main(train_args(work, tmp_path / "straight", *extra)) == 0
    resumed = load_file(run / "composition" / WEIGHTS_NAME)
    straight = load_file(tmp_path / "straight" / "composition" / WEIGHTS_NAME)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert yaml.safe_load((run / "train_args.yaml").read_text())["max_steps"] == 20


def test_demo_command_runs_the_pipeline_with_its_options_and_prints_the_table(tmp_path, monkeypatch, capsys):
    import lmcompose.demos.kv.pipeline as pipeline

    calls = []

    def fake_demo(output_dir, preset="quick", progress=True, seed=0):
        calls.append((output_dir, preset, progress, seed))
        (tmp_path / "out" / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / "results.md").write_text("| model | KV-MATH |\n| CALM | 42.0 |\n")
        return {"rows": []}

    monkeypatch.setattr(pipeline, "run_demo", fake_demo)
    assert main(["demo", "--output", str(tmp_path / "out"), "--preset", "paper", "--no-progress", "--seed", "3"]) == 0
    assert main(["demo", "--output", str(tmp_path / "out")]) == 0
    assert calls == [(str(tmp_path / "out"), "paper", False, 3), (str(tmp_path / "out"), "quick", True, 0)]
    assert "| CALM | 42.0 |" in capsys.readouterr().out
    assert main(["demo", "--preset", "huge"]) == 2
    assert main(["demo", "--seed", "-1"]) == 2


def test_demo_facts_runs_its_pipeline_with_the_seed_and_bad_names_or_options_are_one_line_errors(tmp_path, monkeypatch,
                                                                                                   capsys):
    import lmcompose.demos.facts.pipeline as facts
    from lmcompose.demos.facts.config import FactsPipelineConfig
    from lmcompose.demos.facts.task import FactsTaskConfig

    calls = []

    def fake_demo(output_dir, progress=True, config=None, seed=0):
        calls.append((output_dir, progress, config, seed))
        (tmp_path / "f" / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / "results.md").write_text("| CALM (same tokenizer) | 81.0 |\n")
        return {"rows": {}}

    monkeypatch.setattr(facts, "run_demo", fake_demo)
    assert main(["demo", "facts", "--output", str(tmp_path / "f"), "--seed", "2", "--no-progress"]) == 0
    preset2 = FactsPipelineConfig(task=FactsTaskConfig(seed=2), seed=2)
    assert calls == [(str(tmp_path / "f"), False, preset2, 2)]
    assert "| CALM (same tokenizer) | 81.0 |" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "facts"]) == 0 and calls[-1] == ("lmcompose-demo-facts", True, FactsPipelineConfig(), 0)
    # settings by name, on top of the seed's preset (and from a --config file, as a list)
    assert main(["demo", "facts", "--seed", "1", "--set", "cache_anchor_states=true", "--set",
                 'dc_wordings=["statement", "flat"]', "--set", "task.held_in_fraction=0.4"]) == 0
    config = calls[-1][2]
    assert (config.seed, config.task.seed, config.cache_anchor_states, config.dc_wordings,
            config.task.held_in_fraction) == (1, 1, True, ["statement", "flat"], 0.4)
    (tmp_path / "facts.yaml").write_text("set:\n  - preserve_weight=2.0\n")
    assert main(["demo", "facts", "--config", str(tmp_path / "facts.yaml")]) == 0
    assert calls[-1][2] == FactsPipelineConfig(preserve_weight=2.0)
    capsys.readouterr()
    calls.clear()
    for argv, message in ((["demo", "trivia"], "invalid choice: 'trivia' (choose from 'kv', 'facts')"),
                          (["demo", "facts", "--seed", "-3"], "must be a non-negative integer, got -3"),
                          (["demo", "facts", "--preset", "paper"], "--preset applies to the kv demo"),
                          (["demo", "facts", "--set", "preserve_wieght=2"],
                           "--set: setting 'preserve_wieght=2': expected NAME=JSON with NAME a field of "
                           "FactsPipelineConfig"),
                          (["demo", "facts", "--set", 'dc_wordings=["town"]'], "D_C wordings ['town']: unknown"),
                          (["demo", "kv", "--set", "seed=1"], "--set applies to the facts demo")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert calls == []  # refused before the demo starts


def test_a_demo_refuses_an_output_directory_holding_another_demos_files(tmp_path, capsys):
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv" / "demo.json").write_text('{"demo": "kv"}')
    assert main(["demo", "facts", "--output", str(tmp_path / "kv")]) == 2
    assert "holds the files of the kv demo" in capsys.readouterr().err


def test_checkpoint_connections_trains_the_same_composition(work, tmp_path):
    for name, extra in (("plain", ()), ("recompute", ("--checkpoint-connections",))):
        assert main(train_args(work, tmp_path / name, "--max-steps", "4", *extra)) == 0
    plain = load_file(tmp_path / "plain" / "composition" / WEIGHTS_NAME)
    recomputed = load_file(tmp_path / "recompute" / "composition" / WEIGHTS_NAME)
    assert plain.keys() == recomputed.keys()
    for key in plain:
        assert torch.allclose(plain[key], recomputed[key], atol=1e-5), key
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in plain.items() if ".out." in k)  # it did train
    recorded = yaml.safe_load((tmp_path / "recompute" / "train_args.yaml").read_text())
    assert recorded["checkpoint_connections"] is True
