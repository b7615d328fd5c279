"""Training, evaluation and the CLI with an augment that has its own tokenizer (aligned by characters)."""

import copy
import json

import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.cli import main
from lmcompose.io.collate import collator_for
from lmcompose.io.datasets import tokenize_records
from lmcompose.io.jsonl import Records
from lmcompose.train.evaluation import evaluate_loss
from lmcompose.train.recipe import TrainingConfig, train

from helpers import (
    VOCAB,
    byte_bpe_tokenizer,
    char_tokenizer,
    randomize_composition,
    reverse_records,
    reverse_task,
    tiny_pair,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def bpe_augment(seed: int = 2):
    from lmcompose.testing import tiny_causal_lm

    bpe = byte_bpe_tokenizer()
    return tiny_causal_lm("llama", vocab_size=len(bpe), hidden_size=48, num_layers=4, num_heads=4, seed=seed), bpe


def cross_model(seed: int = 0):
    """A character-level anchor composed with a byte-level BPE augment."""
    anchor = tiny_pair()[0]
    augment, bpe = bpe_augment()
    torch.manual_seed(seed)
    return ComposedModel(anchor, augment, CompositionConfig(connections=[(1, 1), (3, 1)]),
                         tokenizer=char_tokenizer(), augment_tokenizer=bpe)


def records(n: int, seed: int = 0) -> Records:
    return reverse_records(n, seed, source="reverse.jsonl")


@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_batches_are_aligned_as_tokenize_aligns_the_texts(side):
    model = cross_model().double()  # float64: a batch and one text alone sum over other lengths
    randomize_composition(model)
    data = tokenize_records(records(5), model.tokenizer)
    batch = collator_for(model, model.tokenizer, side)([data[i] for i in range(5)])
    texts = [r["prompt"] + r["completion"] for r in records(5).rows]
    expected = model.tokenize(texts, padding_side=side)
    # the data appends EOS, a trailing special token that reads every augment token
    assert batch["augment_input_ids"][0].shape == expected["augment_input_ids"][0].shape
    assert torch.equal(batch["augment_input_ids"][0], expected["augment_input_ids"][0])
    assert torch.equal(batch["augment_attention_mask"][0], expected["augment_attention_mask"][0])
    eos = batch["input_ids"] == model.tokenizer.eos_token_id  # one per row
    augment_mask = batch["augment_attention_mask"][0]
    ends = augment_mask.sum(1) if side == "right" else torch.full((5,), augment_mask.shape[1])
    assert torch.equal(batch["augment_limits"][0][eos], ends)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
        for b, text in enumerate(texts):
            alone = model(**model.tokenize([text])).logits[0]
            real = logits[b][batch["attention_mask"][b].bool()][:-1]  # all but the EOS position
            assert (real - alone).abs().max() < 1e-10


def test_train_with_an_augment_of_another_tokenizer(tmp_path):
    model = cross_model()
    bases = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("connections")}
    data = tokenize_records(records(16), model.tokenizer)
    held = tokenize_records(records(8, seed=1), model.tokenizer)
    config = TrainingConfig(max_steps=20, batch_size=8, learning_rate=1e-2, warmup_steps=0,
                            log_every=1, progress_bar=False, eval_generate=False, cpu=True)
    with torch.no_grad():
        before, _ = evaluate_loss(model, torch.utils.data.DataLoader(data, 8, collate_fn=collator_for(model)))
    result = train(model, data, held, config, tmp_path / "run", tokenizer=model.tokenizer)
    assert result.step == 20 and result.train_loss < before - 0.5
    for key, value in model.state_dict().items():
        if key in bases:
            assert torch.equal(value, bases[key]), key
    # the evaluation train() reports is the loss of the aligned texts, as forward on tokenize() gives it
    exact = copy.deepcopy(model).double()  # float64 for the equality of texts of other lengths
    total, count = 0.0, 0
    with torch.no_grad():
        for row in records(8, seed=1).rows:
            batch = model.tokenize([row["prompt"] + row["completion"]])
            ids = batch["input_ids"][0].tolist() + [model.tokenizer.eos_token_id]
            with_eos = tokenize_records(Records("completion", [row], [1], "x"), model.tokenizer)[0]
            assert ids == with_eos["input_ids"]
            with_eos_batch = collator_for(model)([with_eos])
            assert (exact(**with_eos_batch).logits[0, :-1] - exact(**batch).logits[0]).abs().max() < 1e-10
            full = model(**with_eos_batch).logits[0]
            labels = torch.tensor(with_eos["labels"])
            scored = labels[1:] != -100
            total += torch.nn.functional.cross_entropy(full[:-1][scored], labels[1:][scored], reduction="sum").item()
            count += int(scored.sum())
    assert result.eval_metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_the_augment_state_cache_is_refused_with_another_tokenizer(tmp_path):
    model = cross_model()
    data = tokenize_records(records(4), model.tokenizer)
    with pytest.raises(ValueError, match=r"cache_augment_states \(--cache-augment-states\) needs augments that share "
                                         r"the anchor's tokenizer; augment 0 has its own"):
        train(model, data, None, TrainingConfig(max_steps=1, cache_augment_states=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_augment_text_longer_than_its_context_is_refused_before_training(tmp_path):
    from lmcompose.io.jsonl import DataError
    from lmcompose.testing import tiny_causal_lm

    bpe = byte_bpe_tokenizer()
    short = tiny_causal_lm("llama", vocab_size=len(bpe), hidden_size=48, num_layers=4, num_heads=4, max_positions=6)
    model = ComposedModel(tiny_pair()[0], short, tokenizer=char_tokenizer(), augment_tokenizer=bpe)
    data = tokenize_records(records(4), model.tokenizer)
    with pytest.raises(DataError, match=r"reverse\.jsonl, line 1: the example's text is \d+ tokens in the augment's "
                                        r"own tokenizer, but the augment reads at most 6"):
        train(model, data, None, TrainingConfig(max_steps=1), tmp_path / "run")


def test_cli_trains_evaluates_and_generates_with_augment_tokenizer(tmp_path, capsys):
    anchor = tiny_pair()[0]
    augment, bpe = bpe_augment()
    assert VOCAB != len(bpe)  # the two models really read different ids
    anchor.save_pretrained(tmp_path / "anchor")
    char_tokenizer().save_pretrained(tmp_path / "anchor")
    augment.save_pretrained(tmp_path / "augment")  # no tokenizer beside it: --augment-tokenizer names it
    bpe.save_pretrained(tmp_path / "bpe")
    data = write_jsonl(tmp_path / "train.jsonl", reverse_task(16))
    bases = ["--anchor", str(tmp_path / "anchor"), "--augment", str(tmp_path / "augment"),
             "--augment-tokenizer", str(tmp_path / "bpe")]
    assert main(["train", *bases, "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "6",
                 "--batch-size", "8", "--lr", "1e-2", "--no-progress", "--cpu", "--seed", "1"]) == 0
    composition = str(tmp_path / "run" / "composition")
    assert main(["eval", *bases, "--composition", composition, "--data", str(data), "--no-generate",
                 "--output", str(tmp_path / "eval.json")]) == 0
    reported = json.loads((tmp_path / "eval.json").read_text())["loss"]

    from lmcompose.io.bases import load_base
    from lmcompose.train.evaluation import evaluate

    (anchor, tokenizer), (augment, _) = (load_base(tmp_path / "anchor"), load_base(tmp_path / "augment", with_tokenizer=False))
    model = ComposedModel.from_composition(composition, anchor, augment, tokenizer=tokenizer, augment_tokenizer=bpe)
    expected = evaluate(model, tokenize_records(records(16), model.tokenizer), generate=False)["loss"]
    assert reported == pytest.approx(expected, rel=1e-6)
    capsys.readouterr()
    assert main(["generate", *bases, "--composition", composition, "--prompt", "rev abc =>",
                 "--max-new-tokens", "4"]) == 0
    streamed = capsys.readouterr().out
    from lmcompose.model.completion import complete

    assert streamed.strip() == complete(model, model.tokenizer, "rev abc =>", max_new_tokens=4).strip()
