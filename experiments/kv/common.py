"""Shared helpers of the key-value exploration scripts: encoding, teacher-forced exact match, task overrides."""

from __future__ import annotations

from typing import Sequence

import torch

from lmcompose.demos.kv.training import collate, encode  # noqa: F401 (the scripts import them from here)


@torch.no_grad()
def teacher_forced_accuracy(model, pairs: Sequence[tuple[list[int], list[int]]], pad: int, batch: int = 250) -> float:
    """Teacher-forced exact match: every target token (and </s>) is the argmax = greedy decoding's output."""
    right = 0
    for s in range(0, len(pairs), batch):
        b = collate(pairs[s : s + batch], pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        pred = logits[:, :-1].argmax(-1)
        gold = b["labels"][:, 1:]
        ok = (pred == gold) | (gold == -100)
        right += ok.all(dim=1).sum().item()
    return 100.0 * right / len(pairs)


def held_out_sets(repo, tokenizer) -> dict[str, list]:
    """Encoded (ids, labels) of the held-out evaluation expressions, per dataset (KV-SUBS, NUM-MATH, KV-MATH)."""
    vocab, bos, eos = tokenizer.get_vocab(), tokenizer.bos_token_id, tokenizer.eos_token_id
    ev = repo.evaluation_expressions()
    return {name: [encode(vocab, make(e), bos, eos) for e in ev]
            for name, make in (("KV-SUBS", repo.kv_subs), ("NUM-MATH", repo.num_math), ("KV-MATH", repo.kv_math))}


def anchor_scores(anchor, repo, tokenizer) -> str:
    """The anchor's teacher-forced exact match on held-out NUM-MATH and KV-MATH, as one line."""
    sets, pad = held_out_sets(repo, tokenizer), tokenizer.pad_token_id
    return f"NUM-MATH {teacher_forced_accuracy(anchor, sets['NUM-MATH'], pad):.1f}% KV-MATH {teacher_forced_accuracy(anchor, sets['KV-MATH'], pad):.1f}%"


def add_task_options(ap) -> None:
    """``--value-max`` / ``--num-keys``: the task of older bases (runs before 55 used values 1..9 over 200 keys)."""
    ap.add_argument("--value-max", type=int, default=None, help="task override (must match the bases)")
    ap.add_argument("--num-keys", type=int, default=None, help="task override (must match the bases)")


def apply_task_options(config, args) -> None:
    """Apply :func:`add_task_options`' overrides to a pipeline config, in place."""
    if args.value_max is not None:
        config.task.value_max = args.value_max
    if args.num_keys is not None:
        config.task.num_keys = args.num_keys
