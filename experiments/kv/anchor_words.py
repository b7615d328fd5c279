"""Exploration (run 24+): an anchor that has seen the key tokens as words (copying lists of keys), never their values.

The paper's anchor is a general LM that has read every vocabulary token; an anchor trained on NUM-MATH alone has
never seen a key, so its key embeddings are untrained random vectors. Here a fraction ``--words`` of its training
examples are ``k1 k2 k3`` -> ``k1 k2 k3`` (copy a list of 2-4 random keys), the rest NUM-MATH.
Usage: python anchor_words.py --words 0.3 --out cache/anchor_words
"""

from __future__ import annotations

import argparse
import random

import torch

from common import anchor_scores
from lmcompose.tasks.kv import Example, KVRepository, build_tokenizer, num_math_example
from lmcompose.tasks.kv_pipeline import KVPipelineConfig, new_base, train_lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--words", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="cache/anchor_words")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = KVPipelineConfig(anchor_steps=args.steps)
    repo = KVRepository(config.task)
    tok = build_tokenizer(repo)

    def make(rng: random.Random) -> Example:
        if rng.random() < args.words:
            keys = " ".join(rng.sample(repo.keys, rng.randint(2, 4)))
            return Example(keys, keys)
        return num_math_example(*next(repo.random_numbers(rng)))

    anchor = new_base(config, len(tok), "anchor")
    s = train_lm(anchor, make, tok, args.steps, config.anchor_lr, config, config.seed + 11, print)
    anchor.save_pretrained(args.out)
    print(f"RESULT anchor_words {vars(args)} {anchor_scores(anchor, repo, tok)} in {s:.0f}s")


if __name__ == "__main__":
    main()
