"""Key-value arithmetic (paper §4.1): a key repository, expressions, KV-SUBS / KV-MATH / NUM-MATH, tokenizer.

Every example is text of space-separated vocabulary words. Keys are strings of 2-6 letters, and each key is
ONE vocabulary token (as in the paper's PaLM2 tokenizer); each value is ONE number token. So the anchor
reads an operand at exactly one position, and the augment knows the key's value at that same position
(experiments/kv/LOG.md: with multi-token keys the value exists only at the key's last token, which a
causal cross-attention cannot move back to the operand's first digit). Answers are written digit by digit.

Values are unique in [1, N_KV] as in the paper, or (``value_max``) drawn from a small range shared by many
keys: then every value is held in by some keys, which is what the paper's digit tokenisation gives for free
(every digit is seen in D_C) and what a composition trained on 20% of the keys needs to generalise.

    KV-SUBS   prompt "kab + zuq - mo ="   target "10 + 22 - 24"
    KV-MATH   prompt "kab + zuq - mo ="   target "8"
    NUM-MATH  prompt "10 + 22 - 24 ="     target "8"
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
OPERATORS = ("+", "-", "*")


@dataclass
class KVTaskConfig:
    """The key-value task's scale. Defaults are the CPU ("quick") scale; see ``paper_task()``."""

    num_keys: int = 400  # N_KV, single-token keys (paper: 25K)
    value_max: Optional[int] = 19  # values 1..value_max shared by many keys; None: unique 1..N_KV (runs 1-5, 17, 55)
    min_key_chars: int = 2  # shortest key string (paper: 2)
    max_key_chars: int = 6  # longest key string (paper: 6)
    min_operands: int = 2  # operands per expression (paper: 3-6)
    max_operands: int = 3
    operators: tuple = ("+", "-")  # operators joining operands (paper: + - x)
    held_in_fraction: float = 0.2  # fraction of keys that composition data D_C may use (paper: 20%)
    num_eval: int = 2000  # held-out evaluation expressions, each a KV-SUBS/KV-MATH/NUM-MATH triple (run 58)
    seed: int = 0  # seed of keys, values, split and every sampled expression

    def __post_init__(self) -> None:
        self.operators = tuple(self.operators)
        if not set(self.operators) <= set(OPERATORS):
            raise ValueError(f"operators must be among {OPERATORS}, got {self.operators}")
        if not 1 <= self.min_key_chars <= self.max_key_chars:
            raise ValueError("need 1 <= min_key_chars <= max_key_chars")
        if not 1 <= self.min_operands <= self.max_operands:
            raise ValueError("need 1 <= min_operands <= max_operands")
        if not 0.0 < self.held_in_fraction < 1.0:
            raise ValueError("held_in_fraction must be in (0, 1)")
        if self.max_operands > max(1, int(self.num_keys * self.held_in_fraction)):
            raise ValueError("max_operands is more than the held-in keys: expressions use distinct keys")
        if self.value_max is not None and not 1 <= self.value_max <= self.num_keys:
            raise ValueError("value_max must be in [1, num_keys] (None: unique values 1..num_keys)")

    @property
    def value_range(self) -> int:
        """The largest value: values lie in [1, value_range]."""
        return self.num_keys if self.value_max is None else self.value_max

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def paper_task(seed: int = 0) -> KVTaskConfig:
    """The paper's scale (§4.1): 25K keys, 3-6 keys per expression, + - x (intended for a GPU)."""
    return KVTaskConfig(
        num_keys=25_000, value_max=None, min_operands=3, max_operands=6, operators=("+", "-", "*"), seed=seed
    )


@dataclass(frozen=True)
class Expression:
    """Operand keys joined by operators: ``keys[0] ops[0] keys[1] ops[1] ...``."""

    keys: tuple[str, ...]
    ops: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """One prompt -> target pair (texts of space-separated tokens)."""

    prompt: str
    target: str


class KVRepository:
    """Keys with integer values in [1, value_range], split into held-in (D_C) and held-out keys.

    The split is stratified by value: ``held_in_fraction`` of the keys of each value are held in, so when
    values are shared every value occurs in D_C. With unique values this is a plain random split.

    Args:
        config: the task config; everything is derived from ``config.seed``.
    """

    def __init__(self, config: KVTaskConfig) -> None:
        self.config = config
        rng = random.Random(f"kv-repository-{config.seed}")
        self.keys = _make_keys(config, rng)
        n, v = config.num_keys, config.value_range
        values = [1 + i % v for i in range(n)]  # every value equally often (each once when v == n)
        rng.shuffle(values)
        self.values: dict[str, int] = dict(zip(self.keys, values))
        if config.value_max is None:
            groups = [list(self.keys)]
        else:
            groups = [[k for k in self.keys if self.values[k] == value] for value in range(1, v + 1)]
        held_in: list[str] = []
        for group in groups:
            rng.shuffle(group)
            held_in += group[: max(1, int(round(config.held_in_fraction * len(group))))]
        self.held_in: tuple[str, ...] = tuple(sorted(held_in))
        self.held_out: tuple[str, ...] = tuple(sorted(set(self.keys) - set(held_in)))

    def expressions(self, split: str, rng: random.Random) -> Iterator[Expression]:
        """An endless stream of random expressions over distinct keys of ``split``.

        Args:
            split: "held_in", "held_out" or "all".
            rng: the random source (seed it for reproducible data).
        """
        pool = {"held_in": self.held_in, "held_out": self.held_out, "all": self.keys}[split]
        cfg = self.config
        while True:
            n = rng.randint(cfg.min_operands, cfg.max_operands)
            keys = tuple(rng.sample(pool, n))
            ops = tuple(rng.choice(cfg.operators) for _ in range(n - 1))
            yield Expression(keys, ops)

    def random_numbers(self, rng: random.Random) -> Iterator[tuple[tuple[int, ...], tuple[str, ...]]]:
        """An endless stream of (operand values, ops) over the whole value range (anchor pre-training)."""
        cfg = self.config
        while True:
            n = rng.randint(cfg.min_operands, cfg.max_operands)
            values = tuple(rng.randint(1, cfg.value_range) for _ in range(n))
            yield values, tuple(rng.choice(cfg.operators) for _ in range(n - 1))

    def evaluation_expressions(self) -> list[Expression]:
        """``config.num_eval`` distinct expressions over held-out keys only (fixed by the seed)."""
        rng = random.Random(f"kv-eval-{self.config.seed}")
        seen: dict[Expression, None] = {}
        for expr in self.expressions("held_out", rng):
            seen.setdefault(expr, None)
            if len(seen) == self.config.num_eval:
                return list(seen)
        raise AssertionError("unreachable")

    def key_blind_ceiling(self, max_tuples: int = 2_000_000) -> Optional[float]:
        """The best held-out KV-MATH exact match (%) of a model that cannot tell keys apart, or None if too costly.

        Such a model sees only the operators, so its best answer for each operator pattern is the likeliest value of
        that pattern over held-out keys: what a base model that does not know the keys reaches at best by guessing.
        Exact, for expressions drawn as :meth:`expressions` draws them (distinct keys, uniform operand count and
        operators); it enumerates operand values, so it returns None when that exceeds ``max_tuples``.
        """
        cfg = self.config
        counts = Counter(self.values[k] for k in self.held_out)  # keys per value
        values = sorted(counts)
        if len(values) ** cfg.max_operands > max_tuples:
            return None
        ceiling = 0.0
        arities = range(cfg.min_operands, cfg.max_operands + 1)
        for n in arities:
            ordered_keys = math.perm(len(self.held_out), n)  # ordered tuples of distinct keys
            # operand values, each with its number of ordered tuples of distinct keys (the same for every pattern)
            tuples = [(operands, math.prod(math.perm(counts[v], m) for v, m in Counter(operands).items()))
                      for operands in itertools.product(values, repeat=n)]
            for ops in itertools.product(cfg.operators, repeat=n - 1):
                answers: Counter = Counter()
                for operands, ways in tuples:
                    answers[evaluate(operands, ops)] += ways
                pattern = 1 / (len(arities) * len(cfg.operators) ** (n - 1))
                ceiling += pattern * max(answers.values()) / ordered_keys
        return 100.0 * ceiling

    # ------------------------------------------------------------------ the three datasets

    def kv_subs(self, expr: Expression) -> Example:
        """``<K1> + <K2> - <K3> =`` -> ``10 + 22 - 24``."""
        return Example(key_text(expr), number_text(self.operand_values(expr), expr.ops))

    def kv_math(self, expr: Expression) -> Example:
        """``<K1> + <K2> - <K3> =`` -> ``8``."""
        return Example(key_text(expr), answer_text(evaluate(self.operand_values(expr), expr.ops)))

    def num_math(self, expr: Expression) -> Example:
        """``10 + 22 - 24 =`` -> ``8``."""
        return num_math_example(self.operand_values(expr), expr.ops)

    def operand_values(self, expr: Expression) -> tuple[int, ...]:
        """The values of the expression's keys."""
        return tuple(self.values[k] for k in expr.keys)


def num_math_example(values: Sequence[int], ops: Sequence[str]) -> Example:
    """A NUM-MATH example over explicit numbers."""
    return Example(number_text(values, ops) + " =", answer_text(evaluate(values, ops)))


def key_text(expr: Expression) -> str:
    """The KV prompt: keys and operators, then ``=``."""
    return _join(expr.keys, expr.ops) + " ="


def number_text(values: Sequence[int], ops: Sequence[str]) -> str:
    """Numbers and operators: the KV-SUBS target and the NUM-MATH prompt without ``=``."""
    return _join([str(v) for v in values], ops)


def answer_text(value: int) -> str:
    """An integer written digit by digit, e.g. -108 -> ``- 1 0 8``."""
    digits = " ".join(str(abs(value)))
    return f"- {digits}" if value < 0 else digits


def parse_answer(text: str) -> int:
    """Inverse of :func:`answer_text` (raises ValueError on malformed text)."""
    return int("".join(text.split()))


def evaluate(values: Sequence[int], ops: Sequence[str]) -> int:
    """The value of ``v0 op0 v1 op1 ...`` with the usual precedence (x before + and -)."""
    terms, signs = [values[0]], []
    for op, v in zip(ops, values[1:]):
        if op == "*":
            terms[-1] *= v
        else:
            terms.append(v)
            signs.append(1 if op == "+" else -1)
    return terms[0] + sum(s * t for s, t in zip(signs, terms[1:]))


def _join(operands: Sequence[str], ops: Sequence[str]) -> str:
    words = [operands[0]]
    for op, x in zip(ops, operands[1:]):
        words += [op, x]
    return " ".join(words)


def _make_keys(config: KVTaskConfig, rng: random.Random) -> list[str]:
    """``num_keys`` distinct lowercase strings of min..max_key_chars letters, none equal to another word."""
    keys: dict[str, None] = {}
    letters = string.ascii_lowercase
    lengths = range(config.min_key_chars, config.max_key_chars + 1)
    capacity = sum(len(letters) ** n for n in lengths)
    if config.num_keys > capacity:
        raise ValueError(f"Cannot make {config.num_keys} distinct keys of {config.min_key_chars}-{config.max_key_chars} letters")
    while len(keys) < config.num_keys:
        n = rng.choice(lengths)
        keys.setdefault("".join(rng.choice(letters) for _ in range(n)), None)
    return list(keys)


# ---------------------------------------------------------------------------- tokenizer


def vocabulary(repo: KVRepository) -> list[str]:
    """Every word of the task: special tokens, numbers 0..value_range (digits included), operators, ``=``, keys."""
    words = [PAD, BOS, EOS, UNK]
    words += [str(i) for i in range(0, max(9, repo.config.value_range) + 1)]
    words += list(OPERATORS) + ["="]
    words += list(repo.keys)
    return words


def build_tokenizer(repo: KVRepository) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` shared by both models, built offline.

    Each whitespace-separated word is one token. Save it with ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(repo))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
