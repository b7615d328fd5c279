import pytest
import torch

from lmcompose import ComposedModel
from lmcompose.io.datasets import tokenize_records
from lmcompose.io.jsonl import Records
from lmcompose.model.completion import generate_completions
from lmcompose.train.evaluation import chrf, completion_scores, evaluate, exact_match

from helpers import randomize_composition, reverse_task, tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    anchor, augment = tiny_pair()
    composed = ComposedModel(anchor, augment)
    randomize_composition(composed)
    return composed


def dataset(tok, rows):
    return tokenize_records(Records("completion", rows, list(range(1, len(rows) + 1)), "memory"), tok)


def test_exact_match_and_chrf_on_known_strings():
    assert exact_match(["ab ", " cd", "x"], ["ab", "cd", "y"]) == pytest.approx(2 / 3)
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert chrf(["qqqq"], ["the cat sat"]) < 5 < chrf(["the cat sad"], ["the cat sat"]) < 100
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_loss_weights_every_token_the_same_whatever_the_batching(tok, model):
    data = dataset(tok, reverse_task(7, seed=3))
    total, anchor_total, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            ids, labels = torch.tensor([data[i]["input_ids"]]), torch.tensor([data[i]["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(ids, labels=labels).loss.item() * n
            anchor_total += model.anchor(ids, labels=labels).loss.item() * n
            tokens += n
    for batch_size in (1, 3):
        metrics = evaluate(model, data, tok, batch_size=batch_size, generate=False)
        assert metrics["tokens"] == tokens and metrics["examples"] == 7
        assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-5)
        assert "exact_match" not in metrics
    with model.disable_composition():
        anchor_only = evaluate(model, data, tok, generate=False)["loss"]
    assert anchor_only == pytest.approx(anchor_total / tokens, rel=1e-5)
    assert abs(anchor_total - total) / tokens > 1e-3  # the composition matters, so the two are told apart


def test_greedy_completions_are_scored_against_their_references(tok, model):
    rows = reverse_task(5, seed=4)
    data = dataset(tok, rows)
    prompts = [data.prompt_ids(i) for i in range(len(data))]
    alone = [generate_completions(model, tok, [p], 6)[0] for p in prompts]
    assert generate_completions(model, tok, prompts, 6, batch_size=3) == alone  # left padding changes nothing
    # references equal to what the model generates score 1.0 and chrF 100; the real ones are scored as such
    echoed = dataset(tok, [{"prompt": r["prompt"], "completion": text} for r, text in zip(rows, alone)])
    scores = completion_scores(model, echoed, tok, batch_size=2, max_new_tokens=6)
    assert scores["completions"] == [a for a in alone]
    assert scores["exact_match"] == 1.0 and scores["chrf"] == pytest.approx(100.0)
    real = completion_scores(model, data, tok, max_new_tokens=6, max_examples=3)
    assert real["generated_examples"] == 3
    assert real["exact_match"] == exact_match(real["completions"], [r["completion"] for r in rows[:3]])
