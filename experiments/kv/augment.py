"""Exploration: train the augment m_A on KV-SUBS over every key."""

from __future__ import annotations

import argparse
import random

import torch

from common import encode, exact_match, stream, train
from lmcompose.models import tiny_causal_lm
from lmcompose.tasks.kv import Example, KVRepository, KVTaskConfig, answer_text, build_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default="")
    ap.add_argument("--spell", type=float, default=0.0, help="fraction of '37 =' -> '3 7' examples")
    ap.add_argument("--tie", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    repo = KVRepository(KVTaskConfig(seed=args.seed))
    tok = build_tokenizer(repo)
    vocab, bos, eos, pad = tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    exprs = repo.expressions("all", random.Random(2))
    evals = [encode(vocab, repo.kv_subs(e), bos, eos) for e in repo.evaluation_expressions()]
    model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=4, seed=args.seed + 100, init_std=0.02,
                           tie_word_embeddings=bool(args.tie))
    def make(rng):
        if rng.random() < args.spell:
            v = rng.randint(1, repo.config.value_range)
            return Example(f"{v} =", answer_text(v))
        return repo.kv_subs(next(exprs))

    model.train()
    seconds = train(list(model.parameters()), lambda b: model(**b).loss,
                    stream(lambda rng: make(rng), vocab, bos, eos, pad, args.batch, args.seed),
                    args.steps, args.lr, log_every=200,
                    evaluate=lambda: f"KV-SUBS {exact_match(model.eval(), evals, pad):.1f}%{'' if model.train() else ''}")
    model.eval()
    print(f"RESULT augment {vars(args)} KV-SUBS {exact_match(model, evals, pad):.1f}% in {seconds:.0f}s")
    if args.save:
        model.save_pretrained(args.save)


if __name__ == "__main__":
    main()
