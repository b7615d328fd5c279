"""Shared helpers of the key-value exploration scripts: encoding, batching, training loop, exact match."""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Iterator, Sequence

import torch

from lmcompose.tasks.kv import Example


def encode(vocab: dict[str, int], ex: Example, bos: int, eos: int) -> tuple[list[int], list[int]]:
    """Ids ``<s> prompt target </s>`` and labels (-100 on the prompt)."""
    p = [bos] + [vocab[w] for w in ex.prompt.split()]
    t = [vocab[w] for w in ex.target.split()] + [eos]
    return p + t, [-100] * len(p) + t


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each (b, t)."""
    t = max(len(i) for i, _ in pairs)
    ids = torch.full((len(pairs), t), pad)
    mask = torch.zeros((len(pairs), t), dtype=torch.long)
    labels = torch.full((len(pairs), t), -100)
    for r, (i, l) in enumerate(pairs):
        ids[r, : len(i)] = torch.tensor(i)
        mask[r, : len(i)] = 1
        labels[r, : len(l)] = torch.tensor(l)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
