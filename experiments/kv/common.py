"""Shared helpers of the key-value exploration scripts: encoding, batching, training loop, exact match."""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Iterator, Sequence

import torch

from lmcompose.tasks.kv import Example
from lmcompose.tasks.kv_training import collate, encode  # noqa: F401 (the scripts import them from here)


def train(
    params: list, loss_fn: Callable[[dict], torch.Tensor], batches: Iterator[dict], steps: int, lr: float,
    log_every: int = 500, evaluate: Callable[[], str] | None = None, weight_decay: float = 0.0,
) -> float:
    """AdamW, linear warm-up (5%) then cosine decay; returns seconds spent."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    start = time.time()
    running = None
    for step in range(1, steps + 1):
        loss = loss_fn(next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == steps:
            extra = evaluate() if evaluate is not None else ""
            print(f"  step {step:5d} loss {running:.4f} {time.time() - start:6.1f}s {extra}", flush=True)
    return time.time() - start


@torch.no_grad()
def exact_match(model, pairs: Sequence[tuple[list[int], list[int]]], pad: int, batch: int = 250) -> float:
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


def stream(make: Callable[[random.Random], Example], vocab, bos, eos, pad, batch: int, seed: int) -> Iterator[dict]:
    """Endless batches of ``make(rng)`` examples."""
    rng = random.Random(seed)
    while True:
        yield collate([encode(vocab, make(rng), bos, eos) for _ in range(batch)], pad)


def held_out_sets(repo, tokenizer) -> dict[str, list]:
    """Encoded (ids, labels) of the held-out evaluation expressions, per dataset (KV-SUBS, NUM-MATH, KV-MATH)."""
    vocab, bos, eos = tokenizer.get_vocab(), tokenizer.bos_token_id, tokenizer.eos_token_id
    ev = repo.evaluation_expressions()
    return {name: [encode(vocab, make(e), bos, eos) for e in ev]
            for name, make in (("KV-SUBS", repo.kv_subs), ("NUM-MATH", repo.num_math), ("KV-MATH", repo.kv_math))}


def anchor_scores(anchor, repo, tokenizer) -> str:
    """The anchor's teacher-forced exact match on held-out NUM-MATH and KV-MATH, as one line."""
    sets, pad = held_out_sets(repo, tokenizer), tokenizer.pad_token_id
    return f"NUM-MATH {exact_match(anchor, sets['NUM-MATH'], pad):.1f}% KV-MATH {exact_match(anchor, sets['KV-MATH'], pad):.1f}%"


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
