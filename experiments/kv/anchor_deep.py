"""Exploration (run 40+): anchor variants. More blocks and more operands than the task uses (run 40); noise on
the input embeddings while it trains, so it tolerates an update written into them (run 41).

Usage: python anchor_deep.py --layers 6 --max-ops 4 --steps 2500 --out cache/anchor_deep
       python anchor_deep.py --layers 4 --max-ops 3 --steps 2000 --noise 0.5 --out cache/anchor_noise
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from common import anchor_scores
from lmcompose.tasks.kv import KVRepository, build_tokenizer
from lmcompose.tasks.kv_pipeline import KVPipelineConfig, anchor_data, new_base, train_lm, unknown_keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--max-ops", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--noise", type=float, default=0.0, help="Gaussian noise on the input embeddings, x their RMS")
    ap.add_argument("--out", default="cache/anchor_deep")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = KVPipelineConfig(anchor_layers=args.layers, anchor_steps=args.steps)
    repo = KVRepository(config.task)  # the task (keys, evaluation) is the quick one
    wide = KVRepository(dataclasses.replace(config.task, max_operands=args.max_ops))  # anchor training data
    tok = build_tokenizer(repo)
    anchor = new_base(config, len(tok), "anchor")
    unknown_keys(anchor, tok, repo)
    if args.noise:
        def noisy(module, inputs, out):
            return out + torch.randn_like(out) * args.noise * out.pow(2).mean().sqrt().detach() if module.training else out

        handle = anchor.get_input_embeddings().register_forward_hook(noisy)
    s = train_lm(anchor, anchor_data(wide), tok, args.steps, config.anchor_lr, config, config.seed + 11, print)
    if args.noise:
        handle.remove()
    anchor.save_pretrained(args.out)
    print(f"RESULT anchor_deep {vars(args)} {anchor_scores(anchor, repo, tok)} in {s:.0f}s")


if __name__ == "__main__":
    main()
