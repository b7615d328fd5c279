"""Exploration: compose the cached anchor and augment on D_C (held-in KV-MATH [+ NUM-MATH]) and evaluate."""

from __future__ import annotations

import argparse
import json
import random

import torch
from transformers import AutoModelForCausalLM

from common import encode, exact_match, stream, train
from lmcompose import ComposedModel, CompositionConfig
from lmcompose.models import tiny_causal_lm
from lmcompose.tasks.kv import KVRepository, KVTaskConfig, build_tokenizer, num_math_example


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", default="cache/anchor_plain")
    ap.add_argument("--augment", default="cache/augment")
    ap.add_argument("--connections", default="[[0,0],[1,1]]")
    ap.add_argument("--rotary", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--num-mix", type=float, default=0.5, help="fraction of NUM-MATH examples in D_C")
    ap.add_argument("--random-augment", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    repo = KVRepository(KVTaskConfig(seed=0))
    tok = build_tokenizer(repo)
    vocab, bos, eos, pad = tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    anchor = AutoModelForCausalLM.from_pretrained(args.anchor).eval()
    augment = AutoModelForCausalLM.from_pretrained(args.augment).eval()
    if args.random_augment:
        c = augment.config
        augment = tiny_causal_lm("llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                 num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, seed=7, init_std=0.02)
    torch.manual_seed(args.seed)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=json.loads(args.connections), rotary=bool(args.rotary), num_heads=args.heads or None))
    held_in = repo.expressions("held_in", random.Random(3))
    numbers = repo.random_numbers(random.Random(4))

    def make(rng):
        if rng.random() < args.num_mix:
            return num_math_example(*next(numbers))
        return repo.kv_math(next(held_in))

    ev = repo.evaluation_expressions()
    kv_out = [encode(vocab, repo.kv_math(e), bos, eos) for e in ev]
    num = [encode(vocab, repo.num_math(e), bos, eos) for e in ev]
    rin = repo.expressions("held_in", random.Random(5))
    kv_in = [encode(vocab, repo.kv_math(next(rin)), bos, eos) for _ in range(500)]

    def report():
        model.eval()
        r = f"KV-MATH in {exact_match(model, kv_in, pad):.1f}% out {exact_match(model, kv_out, pad):.1f}% NUM {exact_match(model, num, pad):.1f}%"
        model.train()
        return r

    with model.disable_composition():
        base = f"anchor alone: NUM {exact_match(model, num, pad):.1f}% KV-MATH out {exact_match(model, kv_out, pad):.1f}%"
    print(base, model.summary(), flush=True)
    model.train()
    seconds = train(model.composition_parameters(), lambda b: model(**b).loss,
                    stream(make, vocab, bos, eos, pad, args.batch, args.seed + 10), args.steps, args.lr,
                    log_every=max(100, args.steps // 5), evaluate=report)
    print(f"RESULT compose {vars(args)} {report()} in {seconds:.0f}s")


if __name__ == "__main__":
    main()
