"""Scores of the facts demo: exact match per wording, what a row costs the anchor on ordinary text, its own skill.

Every row is a function of prompts: a ComposedModel (composition on or off), an augment alone, LoRA or a
fine-tuned anchor all go through :func:`lmcompose.model.completion.generate_completions` (greedy).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...core.tokens import encode_prompt
from ...model.completion import generate_completions
from ...train.evaluation import token_kl_sum
from .task import CITIES, Person, answer_of, city_of

Logits = Callable[[dict[str, Any]], torch.Tensor]  # a batch (input_ids, attention_mask, ...) -> logits (B, T, V)
Reference = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]  # -> (logits, shared inputs)


def answer_tokens(tokenizer: Any) -> int:
    """New tokens enough to read a city's whole first word: its longest spelling (a space first) in ``tokenizer``'s
    tokens and one more (a word that goes on is not the city), at least 3: 8 for a character-level tokenizer."""
    longest = max(len(tokenizer(" " + city, add_special_tokens=False)["input_ids"]) for city in CITIES)
    return max(3, longest + 1)


def fact_accuracy(model: Any, tokenizer: Any, people: Sequence[Person], wording: str, batch_size: int = 32) -> float:
    """Percent of ``people`` whose greedy answer to ``wording`` (the first word of the continuation) is their city
    exactly."""
    prompts = [encode_prompt(tokenizer, wording.format(name=p.name)) for p in people]
    answers = generate_completions(model, tokenizer, prompts, max_new_tokens=answer_tokens(tokenizer),
                                   batch_size=batch_size)
    return 100.0 * sum(city_of(a) == p.city for a, p in zip(answers, people)) / len(people)


def arithmetic_items(count: Optional[int] = None, seed: int = 0) -> list[tuple[str, str]]:
    """Few-shot two-operand sums of 1..9 (the anchor's own skill): every pair once, or ``count`` drawn with ``seed``."""
    shots = "".join(f"{x} + {y} = {x + y}\n" for x, y in ((2, 3), (4, 1), (3, 3), (5, 2)))
    pairs = [(x, y) for x in range(1, 10) for y in range(1, 10)]
    if count is not None:
        pairs = random.Random(seed).sample(pairs, count)
    return [(f"{shots}{x} + {y} =", str(x + y)) for x, y in pairs]


def skill_accuracy(model: Any, tokenizer: Any, items: Sequence[tuple[str, str]], batch_size: int = 27) -> float:
    """Percent of few-shot items whose greedy answer (first line) is exactly the expected one."""
    prompts = [encode_prompt(tokenizer, question) for question, _ in items]
    answers = generate_completions(model, tokenizer, prompts, max_new_tokens=3, batch_size=batch_size)
    return 100.0 * sum(answer_of(a) == expected for a, (_, expected) in zip(answers, items)) / len(items)


def ordinary_windows(tokenizer: Any, tokens: int, length: int = 256) -> list[list[int]]:
    """Windows of ``length`` anchor tokens covering the first ``tokens`` tokens of CPython's own documentation
    (``pydoc_data.topics``, every topic in name order): ordinary English no one here wrote."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[name] for name in sorted(topics.topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"pydoc_data.topics has {len(ids)} tokens, fewer than the {tokens} asked for")
    return [ids[start : start + length] for start in range(0, tokens, length)]


@torch.no_grad()
def ordinary_cost(reference: Reference, rows: dict[str, Logits], windows: Sequence[Sequence[int]],
                  batch_size: int = 4) -> dict[str, dict[str, float]]:
    """Mean loss per token on ordinary text and mean KL per position from the anchor, for several rows in one pass.

    The anchor's logits on each batch are computed once and compared with every row's.

    Args:
        reference: the anchor alone: its logits on a batch, and inputs every row's batch gains (``{}`` for none).
        rows: per row name, its logits function.
        windows: the texts, as anchor ids (equal lengths).
    Returns:
        {row: {"loss": nats per token, "kl": nats per position}}, the anchor itself as ``"anchor"``.
    """
    totals = {name: [0.0, 0.0] for name in ("anchor", *rows)}  # summed loss, summed KL
    tokens = positions = 0
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start : start + batch_size])  # (B, T)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        anchor_logits, shared = reference(batch)
        for name, logits_of in (("anchor", None), *rows.items()):
            logits = anchor_logits if logits_of is None else logits_of({**batch, **shared})
            totals[name][0] += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                               reduction="sum").item()
            totals[name][1] += token_kl_sum(anchor_logits, logits, batch["attention_mask"])[0].item()
        tokens += ids[:, 1:].numel()
        positions += ids.numel()
    return {name: {"loss": loss / tokens, "kl": kl / positions} for name, (loss, kl) in totals.items()}
