"""Run 12's character-level CALM row with more composition steps, scored in the facts wordings only (LOG.md
run 12, last table). DEMO is a facts demo output whose augments are trained (the character one with char_varied).

    python char_steps.py STEPS OUT DEMO
"""
import argparse
import dataclasses, json, time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("steps", type=int, help="composition steps")
p.add_argument("out", type=Path, help="where the row is trained")
p.add_argument("demo", type=Path, help="the facts demo output holding the trained augments")
args = p.parse_args()
import torch
from lmcompose.demos.facts.config import AUGMENT_FIELDS, FactsPipelineConfig
from lmcompose.demos.facts.rows import load_anchor, load_augment, train_row_job
from lmcompose.demos.facts.scoring import fact_columns
from lmcompose.demos.facts.task import FactsTask
from lmcompose.model.composed import ComposedModel
steps, out, demo = args.steps, args.out, args.demo
config = dataclasses.replace(FactsPipelineConfig(threads=2), compose_steps=steps)
augments = {"same": str(demo / "augments" / config.fingerprint(*AUGMENT_FIELDS["same"])),
            "char": str(demo / "augments" / config.fingerprint(*AUGMENT_FIELDS["char"]))}
t = time.time()
print(train_row_job("CALM (characters)", config, str(demo / "anchor"), augments, str(out), progress=False), flush=True)
print("train s", round(time.time() - t), flush=True)
anchor, tokenizer = load_anchor(demo / "anchor")
augment, augment_tokenizer = load_augment("char", Path(augments["char"]))
model = ComposedModel.from_composition(out / "run" / "composition", anchor, augment, tokenizer=tokenizer,
                                       augment_tokenizer=augment_tokenizer)
torch.set_num_threads(2)
print(json.dumps(fact_columns(model, tokenizer, FactsTask(config.task), config.eval_held_in, config.eval_held_out)))
