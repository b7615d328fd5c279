"""The key-value arithmetic generator (paper §4.1): keys, values, split, the three datasets, tokenizer."""

import itertools
import random
from collections import Counter

import pytest

from lmcompose.demos.kv.task import (
    Expression,
    KVRepository,
    KVTaskConfig,
    answer_text,
    build_tokenizer,
    evaluate,
    paper_task,
    parse_answer,
)

CONFIGS = [
    KVTaskConfig(),  # quick scale: values 1..19 shared by many keys
    KVTaskConfig(num_keys=300, value_max=None, min_operands=3, max_operands=5, operators=("+", "-", "*")),
]


def _eval_subs(text: str) -> int:
    words = text.split()
    return evaluate([int(w) for w in words[0::2]], words[1::2])


@pytest.mark.parametrize("config", CONFIGS)
def test_keys_are_distinct_letter_strings_in_length_range(config):
    repo = KVRepository(config)
    assert len(repo.keys) == len(set(repo.keys)) == config.num_keys
    for key in repo.keys:
        assert config.min_key_chars <= len(key) <= config.max_key_chars
        assert key.isalpha() and key.islower()


def test_unique_values_cover_one_to_n():
    config = CONFIGS[1]
    repo = KVRepository(config)
    assert sorted(repo.values.values()) == list(range(1, config.num_keys + 1))


def test_shared_values_are_balanced_and_every_value_is_held_in():
    config = KVTaskConfig(num_keys=200, value_max=9)
    repo = KVRepository(config)
    counts = [list(repo.values.values()).count(v) for v in range(1, 10)]
    assert set(counts) <= {22, 23} and sum(counts) == 200
    assert {repo.values[k] for k in repo.held_in} == set(range(1, 10))


@pytest.mark.parametrize("config", CONFIGS)
def test_split_is_disjoint_and_about_twenty_percent(config):
    repo = KVRepository(config)
    assert not set(repo.held_in) & set(repo.held_out)
    assert set(repo.held_in) | set(repo.held_out) == set(repo.keys)
    assert abs(len(repo.held_in) / config.num_keys - config.held_in_fraction) < 0.03


@pytest.mark.parametrize("config", CONFIGS)
def test_evaluation_uses_only_held_out_keys_and_composition_data_only_held_in(config):
    repo = KVRepository(config)
    held_out = set(repo.held_out)
    evaluation = repo.evaluation_expressions()
    assert len(evaluation) == len(set(evaluation)) == config.num_eval
    assert all(set(e.keys) <= held_out for e in evaluation)
    stream = repo.expressions("held_in", random.Random(0))
    assert all(set(next(stream).keys) <= set(repo.held_in) for _ in range(500))


@pytest.mark.parametrize("config", CONFIGS)
def test_expressions_follow_the_config(config):
    repo = KVRepository(config)
    for e in repo.evaluation_expressions():
        assert config.min_operands <= len(e.keys) <= config.max_operands
        assert len(e.ops) == len(e.keys) - 1 and set(e.ops) <= set(config.operators)
        assert len(set(e.keys)) == len(e.keys)


@pytest.mark.parametrize("config", CONFIGS)
def test_the_three_datasets_agree(config):
    repo = KVRepository(config)
    for e in repo.evaluation_expressions()[:200]:
        subs, kv, num = repo.kv_subs(e), repo.kv_math(e), repo.num_math(e)
        assert subs.prompt == kv.prompt  # both read the keys
        assert num.prompt == subs.target + " ="  # NUM-MATH reads what KV-SUBS writes
        assert kv.target == num.target
        assert _eval_subs(subs.target) == parse_answer(kv.target)  # substitute values, evaluate
        assert subs.target.split()[0::2] == [str(repo.values[k]) for k in e.keys]


def test_answers_round_trip_and_precedence():
    for v in (-108, -7, 0, 5, 42, 1234):
        assert parse_answer(answer_text(v)) == v
    assert answer_text(-108) == "- 1 0 8"
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([10, 22, 24], ["+", "-"]) == 8


def test_same_seed_same_data_different_seed_different_data():
    def snapshot(seed):
        repo = KVRepository(KVTaskConfig(seed=seed))
        exprs = repo.evaluation_expressions()[:50]
        stream = repo.expressions("held_in", random.Random(1))
        return repo.values, repo.held_in, [repo.kv_math(e) for e in exprs], [next(stream) for _ in range(20)]

    assert snapshot(0) == snapshot(0)
    a, b = snapshot(0), snapshot(1)
    assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]


def test_tokenizer_is_word_level_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    repo = KVRepository(KVTaskConfig())
    tokenizer = build_tokenizer(repo)
    e = repo.evaluation_expressions()[0]
    for example in (repo.kv_subs(e), repo.kv_math(e), repo.num_math(e)):
        text = f"{example.prompt} {example.target}"
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text.split())  # one token per word: keys and values are single tokens
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.eos_token == tokenizer.eos_token and again.pad_token == tokenizer.pad_token


def test_config_validation_and_paper_scale():
    with pytest.raises(ValueError):
        KVTaskConfig(operators=("/",))
    with pytest.raises(ValueError):
        KVTaskConfig(min_operands=4, max_operands=3)
    with pytest.raises(ValueError):
        KVTaskConfig(num_keys=10, value_max=20)
    paper = paper_task()
    assert paper.num_keys == 25_000 and paper.value_max is None
    assert (paper.min_operands, paper.max_operands) == (3, 6) and "*" in paper.operators


@pytest.mark.parametrize("operators", [("+", "-"), ("+", "-", "*")])
def test_key_blind_ceiling_is_the_best_guess_of_each_operator_pattern(operators):
    repo = KVRepository(KVTaskConfig(num_keys=24, value_max=4, operators=operators, held_in_fraction=0.25))
    # every expression over distinct held-out keys, weighted as expressions() draws them: a model that cannot tell
    # keys apart answers each operator pattern with one number, at best the commonest answer of that pattern
    best, arities = 0.0, (2, 3)
    for n in arities:
        for ops in itertools.product(operators, repeat=n - 1):
            answers = Counter(evaluate(repo.operand_values(Expression(keys, ops)), ops)
                              for keys in itertools.permutations(repo.held_out, n))
            best += max(answers.values()) / sum(answers.values()) / (len(arities) * len(operators) ** (n - 1))
    assert repo.key_blind_ceiling() == pytest.approx(100 * best)
    assert 0 < best < 1


def test_key_blind_ceiling_of_the_quick_task_and_when_it_is_too_costly():
    assert KVRepository(KVTaskConfig()).key_blind_ceiling() == pytest.approx(4.53, abs=0.01)  # under the 5% target
    assert KVRepository(CONFIGS[1]).key_blind_ceiling() is None  # unique values, 3-5 operands: 240**5 tuples
