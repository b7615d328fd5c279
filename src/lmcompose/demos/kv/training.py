"""Training and scoring helpers of the key-value task: encoding, batches, the percent of exact answers."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

import torch

from ...core.padding import IGNORE_INDEX, pad_rows
from .task import Example, parse_answer

Encoded = tuple[list[int], list[int]]  # (ids, labels) of one example


def encode(vocab: dict[str, int], example: Example, bos: int, eos: int) -> Encoded:
    """Ids ``<s> prompt target </s>`` and labels (-100 on ``<s> prompt``)."""
    prompt = [bos] + [vocab[w] for w in example.prompt.split()]
    target = [vocab[w] for w in example.target.split()] + [eos]
    return prompt + target, [-100] * len(prompt) + target


def collate(pairs: Sequence[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch: ``input_ids``, ``attention_mask``, ``labels``, each (b, t)."""
    ids, mask = pad_rows([i for i, _ in pairs], pad)
    labels, _ = pad_rows([l for _, l in pairs], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    make: Callable[[random.Random], Example], tokenizer: Any, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches of ``make(rng)`` examples.

    Args:
        make: draws one example from the seeded ``random.Random`` it is given.
        tokenizer: the task's word-level tokenizer.
        batch_size: examples per batch.
        seed: seed of the example stream.
    """
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    while True:
        yield collate([encode(vocab, make(rng), bos, eos) for _ in range(batch_size)], pad)


@torch.no_grad()
def percent_correct(
    generate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 250,
) -> float:
    """Percent of examples whose greedy continuation, up to ``</s>``, is exactly the target.

    Args:
        generate: (input_ids (b, t) left-padded, attention_mask (b, t), max_new_tokens) -> (b, t + new) ids.
        examples: prompts and targets.
        tokenizer: the task's tokenizer (left padding).
    """
    vocab = tokenizer.get_vocab()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    right = 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        prompts = [[bos] + [vocab[w] for w in ex.prompt.split()] for ex in chunk]
        ids, mask = pad_rows(prompts, pad, "left")  # (b, t) each
        t = ids.shape[1]
        new = max(len(ex.target.split()) for ex in chunk) + 1
        out = generate(ids, mask, new)[:, t:]
        for row, ex in zip(out.tolist(), chunk):
            words = []
            for token in row:
                if token == eos:
                    break
                words.append(tokenizer.convert_ids_to_tokens(token))
            right += " ".join(words) == ex.target
    return 100.0 * right / len(examples)


def answer_is_number(text: str) -> bool:
    """Whether ``text`` parses as an answer (digits, optional leading minus)."""
    try:
        parse_answer(text)
    except ValueError:
        return False
    return True
