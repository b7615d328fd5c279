"""Exploration: how fast does a tiny anchor learn NUM-MATH over single-token numbers?"""

from __future__ import annotations

import argparse
import random

import torch

from common import encode, exact_match, stream, train
from lmcompose.models import tiny_causal_lm
from lmcompose.tasks.kv import KVRepository, KVTaskConfig, Example, build_tokenizer, num_math_example, answer_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--spell", type=float, default=0.0, help="fraction of spelling examples '37 =' -> '3 7'")
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--value-max", type=int, default=9)
    ap.add_argument("--min-ops", type=int, default=2)
    ap.add_argument("--max-ops", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = KVTaskConfig(num_keys=args.keys, value_max=args.value_max, min_operands=args.min_ops, max_operands=args.max_ops, seed=args.seed)
    repo = KVRepository(cfg)
    tok = build_tokenizer(repo)
    vocab = tok.get_vocab()
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    numbers = repo.random_numbers(random.Random(1))

    def make(rng: random.Random) -> Example:
        if rng.random() < args.spell:
            v = rng.randint(1, cfg.value_range)
            return Example(f"{v} =", answer_text(v))
        values, ops = next(numbers)
        return num_math_example(values, ops)

    evals = [encode(vocab, repo.num_math(e), bos, eos) for e in repo.evaluation_expressions()]
    model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=4, seed=args.seed, init_std=0.02)
    model.train()
    seconds = train(list(model.parameters()), lambda b: model(**b).loss,
                    stream(make, vocab, bos, eos, pad, args.batch, args.seed), args.steps, args.lr,
                    evaluate=lambda: f"NUM-MATH {exact_match(model.eval(), evals, pad):.1f}% " + str(model.train() is None))
    model.eval()
    print(f"RESULT anchor {vars(args)} NUM-MATH {exact_match(model, evals, pad):.1f}% in {seconds:.0f}s")
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)


if __name__ == "__main__":
    main()
