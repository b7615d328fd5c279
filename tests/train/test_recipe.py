import json
import os
import shutil

import pytest
import torch

from lmcompose import ComposedModel
from lmcompose.io.composition_files import CONFIG_NAME, WEIGHTS_NAME
from lmcompose.io.datasets import TokenizedDataset, tokenize_records
from lmcompose.train import train
from lmcompose.train.run_log import read_metrics

from helpers import composition_weights as composition
from helpers import reverse_records, tiny_pair
from helpers import train_config as config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eval_data(tok):
    return tokenize_records(reverse_records(5, seed=1), tok)


def composed():
    anchor, augment = tiny_pair()
    return ComposedModel(anchor, augment)


def test_train_moves_only_the_composition_and_writes_the_run(tmp_path, tok, data, eval_data):
    model = composed()
    bases = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("connections.")}
    before = composition(model)
    cfg = config(max_steps=6, save_every=2, keep_last=2, eval_every=3, eval_generate_max_examples=2)
    result = train(model, data, eval_data, cfg, tmp_path, tokenizer=tok)

    assert result.step == 6
    for name, p in model.named_parameters():
        if name in bases:
            assert torch.equal(p, bases[name]), f"base weight {name} changed"
    after = composition(model)
    assert all(not torch.equal(after[k], before[k]) for k in before), "some composition weight did not move"
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in bases)

    # checkpoints: the newest two, each complete, optimiser state loadable with weights_only=True
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-4", "step-6"]
    step6 = tmp_path / "checkpoints" / "step-6"
    assert {CONFIG_NAME, WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"} == set(
        os.listdir(step6)
    )
    optimiser = torch.load(step6 / "optimizer.pt", weights_only=True)
    assert len(optimiser["state"]) == len(model.composition_parameters())
    assert torch.load(step6 / "scheduler.pt", weights_only=True)["last_epoch"] == 6
    assert json.loads((step6 / "trainer_state.json").read_text())["step"] == 6

    # the final composition equals the trained weights and holds nothing of the bases
    loaded = ComposedModel.from_composition(tmp_path / "composition", *tiny_pair())
    assert all(torch.equal(loaded.composition_state_dict()[k], v) for k, v in after.items())
    assert set(os.listdir(tmp_path / "composition")) == {CONFIG_NAME, WEIGHTS_NAME}

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0.0 <= r["eval_exact_match"] <= 1.0 for r in evals)
    assert all(r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the eval loss logged at the end is the token-weighted loss of the final model, computed independently
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(eval_data)):
            ids = torch.tensor([eval_data[i]["input_ids"]])
            labels = torch.tensor([eval_data[i]["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(ids, labels=labels).loss.item() * n
            tokens += n
    assert evals[-1]["eval_tokens"] == tokens
    assert evals[-1]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tok, data):
    # 14 examples, batches of 4 -> 4 micro-batches per epoch; 2 per step -> epochs end mid-window
    cfg = config(max_steps=7, save_every=1, keep_last=10, gradient_accumulation_steps=2, warmup_steps=2)
    straight = composed()
    train(straight, data, None, cfg, tmp_path / "straight", tokenizer=tok)

    interrupted = composed()
    run = tmp_path / "interrupted"
    train(interrupted, data, None, cfg, run, tokenizer=tok)
    for step in range(4, 8):  # as if killed after the checkpoint of step 3 (mid-epoch)
        shutil.rmtree(run / "checkpoints" / f"step-{step}")
    shutil.rmtree(run / "composition")
    (run / "checkpoints" / ".step-4.tmp-123").mkdir()  # a save cut short

    resumed = composed()
    result = train(resumed, data, None, cfg, run, resume=True, tokenizer=tok)
    assert result.resumed_from.name == "step-3" and result.step == 7
    for k, v in composition(straight).items():
        assert torch.equal(resumed.composition_state_dict()[k], v), k
    assert not (run / "checkpoints" / ".step-4.tmp-123").exists()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 8))  # the records after step 3 were rewritten, not duplicated


def test_a_step_weighs_every_target_token_the_same_however_it_is_split_into_micro_batches(tmp_path, tok):
    # completions of 3 to 6 tokens and preservation texts of varied length: a mean per micro-batch would weigh the
    # tokens of short examples more (issue: 8.1e-4 apart after 6 steps); the step's totals make the splits equal
    data = tokenize_records(reverse_records(16, seed=4), tok)
    preserve = TokenizedDataset.from_token_ids([list(range(5, 5 + n)) for n in (3, 9, 5, 12, 4, 7, 10, 6)])
    lengths = {len([t for t in data[i]["labels"] if t != -100]) for i in range(len(data))}
    assert len(lengths) > 1
    runs = {}
    for batch, accumulation in ((8, 1), (4, 2), (2, 4), (1, 8)):
        model = composed()
        cfg = config(max_steps=4, batch_size=batch, gradient_accumulation_steps=accumulation, learning_rate=1e-2,
                     preserve_weight=1.0, preserve_ratio=0.5)
        train(model, data, None, cfg, tmp_path / f"b{batch}", preserve_dataset=preserve)
        runs[batch] = (composition(model), read_metrics(tmp_path / f"b{batch}" / "metrics.jsonl"))
    whole, whole_records = runs[8]
    for batch, (weights, records) in runs.items():
        for k, v in whole.items():
            assert torch.allclose(weights[k], v, atol=1e-5, rtol=0), (batch, k, (weights[k] - v).abs().max())
        losses = [r[key] for r in records if r["kind"] == "train" for key in ("loss", "preserve_kl")]
        expected = [r[key] for r in whole_records if r["kind"] == "train" for key in ("loss", "preserve_kl")]
        assert losses == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in whole.items() if ".out." in k)  # it trained


def test_learning_rate_warms_up_then_decays(tmp_path, data):
    cfg = config(max_steps=6, warmup_steps=2, lr_scheduler="linear", learning_rate=0.01)
    train(composed(), data, None, cfg, tmp_path)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs == pytest.approx([0.005, 0.01, 0.0075, 0.005, 0.0025, 0.0])


def test_refuses_to_overwrite_a_run_or_resume_with_another_config(tmp_path, data):
    cfg = config(max_steps=2, save_every=1)
    train(composed(), data, None, cfg, tmp_path)
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run"):
        train(composed(), data, None, cfg, tmp_path)
    with pytest.raises(ValueError, match=r"learning_rate: 0.01 != 0.02"):
        train(composed(), data, None, config(max_steps=2, save_every=1, learning_rate=0.02), tmp_path, resume=True)
    other = TokenizedDataset.from_token_ids([[5, 6, 7]] * 3)
    with pytest.raises(ValueError, match="training data differ"):
        train(composed(), other, None, cfg, tmp_path, resume=True)


def test_bf16_mixed_precision_keeps_float32_weights(tmp_path, data):
    full = train(composed(), data, None, config(max_steps=2), tmp_path / "fp32")
    model = composed()
    before = composition(model)
    result = train(model, data, None, config(max_steps=2, mixed_precision="bf16"), tmp_path / "bf16")
    assert result.train_loss != full.train_loss and result.train_loss == pytest.approx(full.train_loss, rel=2e-2)
    after = composition(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert result.train_loss is not None and torch.isfinite(torch.tensor(result.train_loss))
    assert "forward" not in vars(model) or vars(model)["forward"].__func__ is ComposedModel.forward  # autocast unwrapped
