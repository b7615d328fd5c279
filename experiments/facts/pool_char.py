"""The character-level CALM row with the augment's states pooled over a causal window of K characters before the
connections read them (K = 1: the preset), scored in the facts wordings (LOG.md run 17). DEMO is a facts demo
output whose character-level augment is trained. Generation runs without a cache (the pooling is applied to whole
texts only).

    python pool_char.py K OUT DEMO [--threads 1] [--steps 300]
"""
import argparse
import functools
import json
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("window", type=int, help="K: characters whose states are averaged (1: none)")
p.add_argument("out", type=Path, help="where the row is trained")
p.add_argument("demo", type=Path, help="the facts demo output holding the trained character-level augment")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, default=300, help="composition steps of the row")
args = p.parse_args()

import torch

from lmcompose.demos.facts import scoring
from lmcompose.demos.facts.config import AUGMENT_FIELDS, FactsPipelineConfig
from lmcompose.demos.facts.rows import load_anchor, load_augment, train_row_job
from lmcompose.demos.facts.task import FactsTask
from lmcompose.model.composed import ComposedModel

K = args.window
plain_augment_hidden = ComposedModel.augment_hidden


def pooled_augment_hidden(self, a, input_ids, attention_mask=None, position_ids=None, cache=None):
    """The captured states, each averaged with the K - 1 before it (padding excluded)."""
    states = plain_augment_hidden(self, a, input_ids, attention_mask, position_ids, cache)
    if K <= 1:
        return states
    assert cache is None, "pooled states are computed over whole texts only"
    some = next(iter(states.values()))
    m = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(some.dtype)[..., None]

    def window_sums(x):  # (b, s, D): each position's sum with the K - 1 before it
        padded = torch.cat([x.new_zeros(x.shape[0], K - 1, x.shape[2]), x], dim=1)
        return padded.unfold(1, K, 1).sum(dim=-1)

    return {i: window_sums(h * m) / window_sums(m).clamp(min=1) for i, h in states.items()}


ComposedModel.augment_hidden = pooled_augment_hidden
config = FactsPipelineConfig(threads=args.threads, char_compose_steps=args.steps)
augments = {"same": "unused", "char": str(args.demo / "augments" / config.fingerprint(*AUGMENT_FIELDS["char"]))}
started = time.time()
if not (args.out / "done.json").exists():
    print(train_row_job("CALM (characters)", config, str(args.demo / "anchor"), augments, str(args.out)), flush=True)
print("train s", round(time.time() - started), flush=True)
anchor, tokenizer = load_anchor(args.demo / "anchor")
augment, augment_tokenizer = load_augment("char", Path(augments["char"]))
model = ComposedModel.from_composition(args.out / "run" / "composition", anchor, augment, tokenizer=tokenizer,
                                       augment_tokenizer=augment_tokenizer)
model.generate = functools.partial(model.generate, use_cache=False)
torch.set_num_threads(args.threads)
print(json.dumps(scoring.fact_columns(model, tokenizer, FactsTask(config.task), config.eval_held_in,
                                      config.eval_held_out)), flush=True)
