"""Where the character-level composition reads: each connection's attention, at the last prompt position (where
the city's first token is predicted), over the augment's positions, for held-out people in every wording.
Positions are grouped by where their character stands: the null key (read nothing), before the name, the name's
characters, the one right after the name (+1: " " in "NAME lives", "'" in "NAME's home"), +2 to +4, and later.

    python attention_char.py DEMO [--people 60]

DEMO is a facts demo output with its character augment and its "CALM (characters)" row trained.
"""
import argparse
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("demo", type=Path)
p.add_argument("--people", type=int, default=60)
p.add_argument("--char-compose-steps", type=int, default=None, help="the row's char_compose_steps (its cache key)")
args = p.parse_args()

import torch
import torch.nn.functional as F

from lmcompose.core.cross_attention import CrossAttention
from lmcompose.demos.facts.config import AUGMENT_FIELDS, FactsPipelineConfig, row_fields
from lmcompose.demos.facts.rows import load_anchor, load_augment, row_folder_name
from lmcompose.demos.facts.task import DC_WORDINGS, UNSEEN_WORDINGS, FactsTask
from lmcompose.model.composed import ComposedModel

torch.set_num_threads(2)
config = FactsPipelineConfig(char_compose_steps=args.char_compose_steps)
row = "CALM (characters)"
anchor, tokenizer = load_anchor(args.demo / "anchor")
augment, augment_tokenizer = load_augment("char", args.demo / "augments" / config.fingerprint(*AUGMENT_FIELDS["char"]))
composition = args.demo / "rows" / config.fingerprint(*row_fields(config, row)) / row_folder_name(row) / "run" / "composition"
model = ComposedModel.from_composition(composition, anchor, augment, tokenizer=tokenizer, augment_tokenizer=augment_tokenizer)

seen = []  # per connection call: (heads, 1 + keys) attention of the last query


def recording(self, anchor_hidden, keys, values, mask=None, positions=None):
    q = self._heads(self._query(anchor_hidden))  # (b, h, t, d)
    k, _, scores = self._with_null(keys, values, mask, anchor_hidden.shape[1])
    probs = F.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + scores, dim=-1)  # (b, h, t, 1 + s)
    seen.append(probs[0, :, -1])
    return original(self, anchor_hidden, keys, values, mask, positions)


original = CrossAttention.forward
CrossAttention.forward = recording
groups = ("null", "before", "name", "+1", "+2..4", "later")
task = FactsTask(config.task)
print(f"{args.people} held-out people; mean attention of the last prompt position, over heads and people; "
      "connections into anchor blocks " + ", ".join(str(b) for _, b in model.resolved_connections[0]))
print("| wording | connection | " + " | ".join(groups) + " |")
print("|---|---|" + "---|" * len(groups))
for wording, template in {**DC_WORDINGS, **UNSEEN_WORDINGS}.items():
    totals = None
    for person in task.held_out[: args.people]:
        text = template.format(name=person.name)
        start = text.index(person.name)
        end = start + len(person.name)  # augment position of character c is c + 1 (its BOS in front)
        seen.clear()
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"), use_cache=False)
        sums = []
        for probs in seen:
            mass = probs.mean(0)  # (1 + s)
            chars = mass[1:]  # position 0 of the keys is the augment's BOS: counted with "before"
            where = torch.arange(chars.shape[0]) - 1  # the character each key ends on (-1: BOS)
            parts = [mass[0], chars[where < start].sum(), chars[(where >= start) & (where < end)].sum(),
                     chars[where == end].sum(), chars[(where > end) & (where <= end + 3)].sum(), chars[where > end + 3].sum()]
            sums.append(torch.stack(parts))
        batch = torch.stack(sums)  # (connections, groups)
        totals = batch if totals is None else totals + batch
    for c, row_mass in enumerate(totals / args.people):
        print(f"| {wording} | {c} | " + " | ".join(f"{100 * float(x):.0f}" for x in row_mass) + " |", flush=True)
