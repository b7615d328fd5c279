"""Exploration (run 54): the same anchor with an augment trained for another number of steps.

Usage: python aug_bases.py BASES OUT STEPS [--seed N] [--lr LR] [--hidden H] [--layers L] [--value-max V --num-keys K]
(run 54: --value-max 9 --num-keys 200, the task of those bases)
Copies BASES' tokenizer and anchor to OUT and trains a new augment there (the pipeline's augment recipe).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from lmcompose.demos.kv.config import quick_config
from lmcompose.demos.kv.pipeline import train_base

from common import add_task_options, apply_task_options


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bases")
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    add_task_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = quick_config(args.seed)
    apply_task_options(config, args)
    config.augment_steps = args.steps
    config.augment_lr = args.lr or config.augment_lr
    config.augment_hidden = args.hidden or config.augment_hidden
    config.augment_layers = args.layers or config.augment_layers
    src, out = Path(args.bases), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in ("tokenizer", "anchor"):
        shutil.copytree(src / part, out / part, dirs_exist_ok=True)
    seconds = train_base("augment", config, str(out), progress=True)
    print(f"AUGMENT {vars(args)} {seconds:.0f}s")


if __name__ == "__main__":
    main()
