"""The character-level CALM row's greedy answers in one wording, for the first held-out people (what a miss looks
like: another city, or an answer that does not start with one), and how its misses are spread over the cities.
Reads a lookahead_char.py output folder (LOG.md run 24).

    python answers_char.py OUT [--seed 0] [--wording reside] [--people 300] [--show 20]
"""
import argparse
import collections
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("out", type=Path, help="a lookahead_char.py output folder (anchor/, augments/, row/)")
p.add_argument("--seed", type=int, default=0, help="the demo's seed it was trained with")
p.add_argument("--wording", default="reside", help="a key of the demo's wordings (statement, question, ...)")
p.add_argument("--people", type=int, default=300, help="held-out people asked")
p.add_argument("--show", type=int, default=20, help="answers printed")
args = p.parse_args()

import torch

from lmcompose.core.tokens import encode_prompt
from lmcompose.demos.facts.evaluation import answer_tokens
from lmcompose.demos.facts.rows import load_anchor, load_augment
from lmcompose.demos.facts.scoring import WORDINGS
from lmcompose.demos.facts.task import FactsTask, FactsTaskConfig, city_of
from lmcompose.model.completion import generate_completions
from lmcompose.model.composed import ComposedModel

torch.set_num_threads(1)
anchor, tokenizer = load_anchor(args.out / "anchor")
augment_dir = next((args.out / "augments").iterdir())
augment, augment_tokenizer = load_augment("char", augment_dir)
model = ComposedModel.from_composition(args.out / "row" / "run" / "composition", anchor, augment, tokenizer=tokenizer,
                                       augment_tokenizer=augment_tokenizer)
people = FactsTask(FactsTaskConfig(seed=args.seed)).held_out[: args.people]
prompts = [encode_prompt(tokenizer, WORDINGS[args.wording].format(name=person.name)) for person in people]
answers = generate_completions(model, tokenizer, prompts, max_new_tokens=answer_tokens(tokenizer), batch_size=32)
for person, answer in list(zip(people, answers))[: args.show]:
    print(f"{person.name!r:28} {person.city:12} -> {answer!r}")
said = [city_of(a) for a in answers]
right = sum(s == person.city for s, person in zip(said, people))
print(f"exact {100 * right / len(people):.1f}% of {len(people)}")
print("first words of the misses:", collections.Counter(s for s, person in zip(said, people) if s != person.city)
      .most_common(8))
print("misses by true city:", collections.Counter(person.city for s, person in zip(said, people) if s != person.city)
      .most_common(10))
