"""Does the character-level augment depend on the CPU's vector instructions (LOG.md run 25)? Trains the demo's
character-level augment for one seed in this process and prints what decides its floats: torch's CPU capability,
the MKL and oneDNN settings from the environment, a SHA-256 of the trained weights, and (with --score) the
augment alone in the facts wordings. Run it with and without the knobs that pin a code path, e.g.

    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python cpu_kinds.py OUT --seed 1 --score

and compare the hashes; the knobs must be set before torch is imported, as here.

    python cpu_kinds.py OUT [--seed 1] [--steps N] [--threads 1] [--score]
"""
import argparse
import hashlib
import json
import os
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("out", type=Path, help="where the augment is trained and saved (and results.json)")
p.add_argument("--seed", type=int, default=1, help="the demo's seed (task and models)")
p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's char_steps)")
p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's workers use 1)")
p.add_argument("--score", action="store_true", help="also score the augment alone in every wording")
args = p.parse_args()

KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")

import torch
from safetensors.torch import load_file

from lmcompose.demos.facts import scoring
from lmcompose.demos.facts.config import preset
from lmcompose.demos.facts.rows import load_augment, train_augment_job
from lmcompose.demos.facts.task import FactsTask

config = preset(args.seed, threads=args.threads)
if args.steps is not None:
    config.char_steps = args.steps
figures = {"capability": torch.backends.cpu.get_cpu_capability(), **{k: os.environ.get(k) for k in KNOBS},
           "steps": config.char_steps, "seed": args.seed}
print(json.dumps(figures), flush=True)
started = time.time()
train_augment_job("char", config, "unused", str(args.out), progress=False)
figures["seconds"] = round(time.time() - started)
weights = load_file(args.out / "char" / "model.safetensors")
digest = hashlib.sha256()
for name in sorted(weights):
    digest.update(name.encode() + weights[name].contiguous().view(torch.uint8).numpy().tobytes())
figures["weights sha256"] = digest.hexdigest()[:16]
if args.score:
    augment, augment_tokenizer = load_augment("char", args.out)
    figures["augment alone"] = scoring.fact_columns(augment, augment_tokenizer, FactsTask(config.task),
                                                    config.eval_held_in, config.eval_held_out)
(args.out / "results.json").write_text(json.dumps(figures, indent=1))
print(json.dumps(figures), flush=True)
