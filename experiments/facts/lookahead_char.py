"""The character-level augment trained to predict K characters ahead (multi-token prediction,
``FactsPipelineConfig.char_lookahead``), then the character-level CALM row on it, scored in the facts wordings,
with its cost to the anchor (LOG.md runs 19 and 24). Everything goes under OUT: the anchor saved from the GGUF, the
augment, the row, results.json. A step already done (its folder complete, its figures in results.json) is reused.
It runs in this process with the machine's own CPU kernels; the demo holds its jobs to AVX2 ones
(``FactsPipelineConfig.cpu_kernels``, run 25), which ``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2`` before the command gives.

    python lookahead_char.py K OUT [--threads 2] [--seed 0] [--compose-steps N]
"""
import argparse
import json
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("lookahead", type=int, help="K: characters each position predicts (1: the preset, the next only)")
p.add_argument("out", type=Path, help="where everything is trained and saved")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0, help="the demo's seed (task and models)")
p.add_argument("--compose-steps", type=int, default=None,
               help="the row's composition steps (default: the preset's char_compose_steps)")
args = p.parse_args()

import torch

from lmcompose.demos.facts import evaluation, scoring
from lmcompose.demos.facts.config import AUGMENT_FIELDS, preset
from lmcompose.demos.facts.rows import load_anchor, load_augment, save_anchor, train_augment_job, train_row_job
from lmcompose.demos.facts.task import FactsTask
from lmcompose.model.composed import ComposedModel

config = preset(args.seed, threads=args.threads, char_lookahead=args.lookahead)
if args.compose_steps is not None:
    config.char_compose_steps = args.compose_steps
out = args.out
out.mkdir(parents=True, exist_ok=True)
if not (out / "anchor").exists():
    save_anchor(out / "anchor")
augment_dir = out / "augments" / config.fingerprint(*AUGMENT_FIELDS["char"])
figures = {}
if not (augment_dir / "char" / "config.json").exists():
    figures["augment s"] = round(train_augment_job("char", config, str(out / "anchor"), str(augment_dir),
                                                   progress=True))
    print("augment s", figures["augment s"], flush=True)
started = time.time()
row = out / "row"
if not (row / "done.json").exists():
    print(train_row_job("CALM (characters)", config, str(out / "anchor"), {"same": "unused", "char": str(augment_dir)},
                        str(row)), flush=True)
    figures["row s"] = round(time.time() - started)
anchor, tokenizer = load_anchor(out / "anchor")
augment, augment_tokenizer = load_augment("char", augment_dir)
model = ComposedModel.from_composition(row / "run" / "composition", anchor, augment, tokenizer=tokenizer,
                                       augment_tokenizer=augment_tokenizer)
torch.set_num_threads(args.threads)
task = FactsTask(config.task)
if (out / "results.json").exists():  # scored before: keep those figures, add what is missing
    figures = {**json.loads((out / "results.json").read_text()), **figures}
if "CALM (characters)" not in figures:
    figures["CALM (characters)"] = scoring.fact_columns(model, tokenizer, task, config.eval_held_in,
                                                        config.eval_held_out)
    figures["augment alone"] = scoring.fact_columns(augment, augment_tokenizer, task, config.eval_held_in,
                                                    config.eval_held_out)
if "cost" not in figures:  # what the row costs the anchor: loss and KL on pydoc text, the few-shot sums
    started = time.time()
    costs = evaluation.ordinary_cost(scoring.ordinary_reference(anchor, [model]),
                                     {"row": scoring.composed_logits(model)},
                                     evaluation.ordinary_windows(tokenizer, config.ordinary_tokens))
    items = evaluation.arithmetic_items(config.skill_items)
    figures["cost"] = {"anchor": costs["anchor"], "row": costs["row"],
                       "sums anchor": evaluation.skill_accuracy(anchor, tokenizer, items),
                       "sums row": evaluation.skill_accuracy(model, tokenizer, items),
                       "seconds": round(time.time() - started)}
print(json.dumps(figures), flush=True)
(out / "results.json").write_text(json.dumps(figures, indent=2))
