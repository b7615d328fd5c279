"""The pipeline's CALM row with overrides (LOG.md runs 46-55: connections, heads, steps, lr, batch, D_C mix, clipping,
weight decay, the share of three-operand expressions), on bases the pipeline cached.

Usage: python window.py BASES [--connections JSON] [--steps N] [--heads H] [--lr LR] [--batch B] [--mix M] [--seed N]
       [--three P] [--wd W] [--clip C] [--no-rotary] [--value-max V --num-keys K]

BASES is a folder ``lmcompose demo`` wrote (OUTPUT/bases/<fingerprint>); the task options must match it (runs 46-54 used
--value-max 9 --num-keys 200). Prints teacher-forced exact match (= greedy) on held-in / held-out KV-MATH by operand
count and NUM-MATH; run 54's held-out 98.6%: ``python window.py BASES_OF_RUN_54 --value-max 9 --num-keys 200``.
(The per-connection attention window of runs 46a-46c, worse than none, was removed with the layout change.)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.demos.kv.config import quick_config
from lmcompose.demos.kv.pipeline import composition_data, load_bases
from lmcompose.demos.kv.task import KVRepository, num_math_example
from lmcompose.demos.kv.training import batches
from lmcompose.train.base_training import train_loop

from common import add_task_options, apply_task_options, encode, teacher_forced_accuracy


def three_operand_mix(repo: KVRepository, config, three: float):
    """D_C whose KV-MATH expressions have 3 operands with probability ``three`` (else 2)."""

    def only(n):
        return (e for e in repo.expressions("held_in", random.Random(config.seed + 100 + n)) if len(e.keys) == n)

    pools = {n: only(n) for n in (2, 3)}

    def make(rng):
        if rng.random() < config.num_math_mix:
            return num_math_example(*next(repo.random_numbers(rng)))
        return repo.kv_math(next(pools[3 if rng.random() < three else 2]))

    return make


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bases")
    ap.add_argument("--connections", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--mix", type=float, default=None, help="fraction of NUM-MATH in D_C")
    ap.add_argument("--no-rotary", action="store_true")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (the pipeline: 1)")
    ap.add_argument("--seed", type=int, default=0, help="the preset's seed (task and models; must match the bases)")
    add_task_options(ap)
    ap.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay (the pipeline: 0)")
    ap.add_argument("--three", type=float, default=None, help="probability of 3 operands in D_C's KV-MATH (None: uniform)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = quick_config(args.seed)
    apply_task_options(config, args)
    if args.connections:
        config.connections = json.loads(args.connections)
    for name, field in (("steps", "compose_steps"), ("heads", "compose_heads"), ("lr", "compose_lr"), ("batch", "batch_size"),
                        ("mix", "num_math_mix")):
        if getattr(args, name) is not None:
            setattr(config, field, getattr(args, name))
    anchor, augment, tok = load_bases(Path(args.bases))
    repo = KVRepository(config.task)
    torch.manual_seed(config.seed)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=config.connections, rotary=not args.no_rotary,
                                                             num_heads=config.compose_heads))
    vocab, bos, eos, pad = tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    ev = repo.evaluation_expressions()
    rin = repo.expressions("held_in", random.Random(5))
    held_in = [next(rin) for _ in range(500)]

    def report() -> str:
        model.eval()
        parts = []
        for label, exprs in (("in", held_in), ("out", ev)):
            pairs = [encode(vocab, repo.kv_math(e), bos, eos) for e in exprs]
            by = {n: teacher_forced_accuracy(model, [p for p, e in zip(pairs, exprs) if len(e.keys) == n], pad) for n in (2, 3)}
            parts.append(f"{label} {teacher_forced_accuracy(model, pairs, pad):.1f} ({by[2]:.1f}/{by[3]:.1f})")
        num = teacher_forced_accuracy(model, [encode(vocab, repo.num_math(e), bos, eos) for e in ev], pad)
        model.train()
        return "KV-MATH " + " ".join(parts) + f" NUM {num:.1f}"

    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *a, **k):  # the pipeline's loop clips at 1; record the norms
        norm = clip(parameters, args.clip, *a, **k)
        norms.append(norm.item())
        if len(norms) % 250 == 0:
            recent = sorted(norms[-250:])
            print(f"  grad norm median {recent[125]:.2f}, clipped {sum(n > args.clip for n in recent) / 2.5:.0f}%")
        return norm

    torch.nn.utils.clip_grad_norm_ = recording_clip
    adamw = torch.optim.AdamW
    torch.optim.AdamW = lambda params, **k: adamw(params, **{**k, "weight_decay": args.wd})
    model.train()
    make = composition_data(repo, config.num_math_mix)
    if args.three is not None:  # D_C's KV-MATH with P(3 operands) = --three
        make = three_operand_mix(repo, config, args.three)
    data = batches(make, tok, config.batch_size, config.seed + 13)
    seconds = train_loop(model.composition_parameters(), lambda b: model(**b).loss, data, config.compose_steps,
                         config.compose_lr, lambda m: print(m, flush=True), log_every=500)
    print(f"RESULT {vars(args)} {report()} {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
