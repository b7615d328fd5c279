"""Train (or load) the pipeline's two bases for a task variant and score them (teacher-forced EM): LOG.md runs 53-58.

Usage: python bases.py --value-max 19 --num-keys 400 --anchor-steps 8000 --augment-steps 3000 --noise 1.0 [--anchor-lr LR]
       (run 58a: --anchor-lr 2e-3 --seed 1 and --seed 2)
Bases go to cache/pipeline/<fingerprint>/ (the pipeline's own cache layout); the folder is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lmcompose.demos.kv.config import KVPipelineConfig
from lmcompose.demos.kv.pipeline import load_or_train_bases
from lmcompose.demos.kv.task import KVRepository, KVTaskConfig

from common import anchor_scores, held_out_sets, teacher_forced_accuracy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--value-max", type=int, default=9)
    ap.add_argument("--num-keys", type=int, default=200)
    ap.add_argument("--min-ops", type=int, default=2)
    ap.add_argument("--max-ops", type=int, default=3)
    ap.add_argument("--anchor-steps", type=int, default=2000)
    ap.add_argument("--augment-steps", type=int, default=500)
    ap.add_argument("--anchor-lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=None, help="anchor_embedding_noise (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = KVTaskConfig(num_keys=args.num_keys, value_max=args.value_max, min_operands=args.min_ops,
                        max_operands=args.max_ops, seed=args.seed)
    config = KVPipelineConfig(task=task, anchor_steps=args.anchor_steps, augment_steps=args.augment_steps,
                              anchor_lr=args.anchor_lr, seed=args.seed)
    if args.noise is not None:
        config.anchor_embedding_noise = args.noise
    repo = KVRepository(task)
    anchor, augment, tok, info = load_or_train_bases(config, repo, Path("cache/pipeline"), log=print)
    print("folder", Path("cache/pipeline") / config.base_fingerprint(), {k: v for k, v in info.items() if k != "config"})
    subs = held_out_sets(repo, tok)["KV-SUBS"]
    print(f"RESULT bases {vars(args)} anchor {anchor_scores(anchor, repo, tok)} "
          f"augment KV-SUBS {teacher_forced_accuracy(augment, subs, tok.pad_token_id):.1f}% held-in keys {len(repo.held_in)}")


if __name__ == "__main__":
    main()
