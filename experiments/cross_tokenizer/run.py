"""SmolLM2-135M composed with a character-level augment that knows where invented people live.

    python experiments/cross_tokenizer/run.py [--output experiments/cross_tokenizer/out] [--steps 300]
    (results and the commands of each row: experiments/cross_tokenizer/README.md)

The augment is a small Llama with a character-level tokenizer (so it shares no token with SmolLM2's
49K BPE vocabulary), trained here on sentences such as "Vorneth lives in Lima." for every invented
person. SmolLM2 has never seen these names. The composition is trained with `lmcompose.training.train`
on prompts about 40% of the people ("Vorneth lives in " -> "Lima"; ``--prompt question`` asks a question
first), mixed with texts SmolLM2 wrote itself (loss on every token: ordinary text must stay as the anchor
has it), and scored by exact match of greedy generation on the other 60%, whose answers only the augment holds. Both models
read the same text in their own tokens; the alignment decides which augment characters each SmolLM2
token may read. Prints and writes a table (results.md, results.json) with the CPU time of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.core.tokens import encode_prompt
from lmcompose.demos.facts.augments import char_tokenizer  # every character a token, BOS in front
from lmcompose.io.bases import load_base
from lmcompose.io.datasets import TokenizedDataset, tokenize_records
from lmcompose.io.jsonl import Records
from lmcompose.model.completion import generate_completions
from lmcompose.testing import tiny_causal_lm
from lmcompose.train import TrainingConfig, train
from lmcompose.train.base_training import train_loop
from lmcompose.train.evaluation import evaluate

# Ten cities whose names SmolLM2 writes easily: the answer is one of them (chance = 10%).
CITIES = ["Paris", "London", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Berlin", "Madrid", "Dublin"]
SYLLABLES = ["ka", "lo", "vor", "neth", "zi", "bra", "mun", "tel", "qua", "ris", "dor", "fen", "gal", "hy", "jum",
             "pex", "sol", "tra", "vin", "wek", "yor", "zan", "bel", "cru", "dax", "ob", "ul", "ish"]
TEMPLATES = ["{name} lives in {city}.", "{city} is where {name} lives.", "{name} has a home in {city}."]
# The answer starts after "lives in ", the augment's own cue: its last layer at that space is where it predicts
# the city (a linear probe reads the city there for 93% of held-out people; at the name, the "?" or "in", 10-19%).
PROMPTS = {
    "statement": "{name} lives in ",  # the augment's own wording
    "question": "Q: Where does {name} live?\nA: {name} lives in ",  # a question first: harder for the augment
}
GENERAL = [  # ordinary text: the composed model must keep SmolLM2's own language modelling
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A triangle has three sides and a square has four.",
    "The sun rises in the east and sets in the west.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "In 1969 two astronauts walked on the Moon.",
    "Python is a programming language that many scientists use.",
    "The Pacific is the largest ocean on Earth.",
]


def invented_people(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (name, city) pairs: unique invented names, cities balanced across people."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if 5 <= len(name) <= 10:
            names.add(name)
    ordered = sorted(names)
    rng.shuffle(ordered)
    return [(name, CITIES[i % len(CITIES)]) for i, name in enumerate(ordered)]


def train_augment(people, folder: Path, steps: int, seed: int, log, most_facts: int = 1,
                  batch_size: int = 32) -> tuple[torch.nn.Module, object, float]:
    """The augment: a 4 x 192 Llama over characters, trained on every person's facts (cached in ``folder``)."""
    if (folder / "config.json").is_file():
        model, tokenizer = load_base(folder)
        log(f"augment: reused {folder}")
        return model, tokenizer, 0.0
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=192, num_layers=4, num_heads=6,
                           max_positions=512, seed=seed, init_std=0.02).train()
    rng = random.Random(seed)

    def passage() -> str:
        """1 to ``most_facts`` facts in a row, sometimes about the same person twice (with several, the augment
        learns to find a person's city wherever the name stands in a text, not only at the start of a line)."""
        facts, person = [], rng.choice(people)
        for _ in range(rng.randint(1, most_facts)):
            person = person if facts and rng.random() < 0.3 else rng.choice(people)
            facts.append(rng.choice(TEMPLATES).format(name=person[0], city=person[1]))
        return rng.choice([" ", "\n"]).join(facts)

    def stream():
        while True:
            batch = tokenizer([passage() for _ in range(batch_size)], padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            yield {**batch, "labels": labels}

    seconds = train_loop(model.parameters(), lambda b: model(**b).loss, stream(), steps, 3e-3, log, log_every=500)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, seconds


@torch.no_grad()
def augment_recall(model, tokenizer, people, text: str = "{name} lives in") -> float:
    """Percent of people whose city the augment writes after ``text`` (its own knowledge)."""
    right = 0
    for start in range(0, len(people), 64):
        chunk = people[start : start + 64]
        batch = tokenizer([text.format(name=n) for n, _ in chunk], padding=True, padding_side="left", return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=9, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row, (_, city) in zip(out[:, batch["input_ids"].shape[1] :].tolist(), chunk):
            right += tokenizer.decode(row, skip_special_tokens=True).strip().startswith(city + ".")
    return 100.0 * right / len(people)


def question_records(people, source: str, prompt: str) -> Records:
    rows = [{"prompt": prompt.format(name=n), "completion": c} for n, c in people]
    return Records(kind="completion", rows=rows, lines=list(range(1, len(rows) + 1)), source=source)


@torch.no_grad()
def anchor_samples(anchor, tokenizer, count: int, seed: int) -> list[str]:
    """Texts SmolLM2 writes itself (sampled from short openings): mixed into the composition data with a loss on
    every token, they teach the connections to leave ordinary text as the anchor has it."""
    torch.manual_seed(seed)
    openings = ["The", "In", "A", "Scientists", "Once upon a time", "My", "Today", "The history of", "How to",
                "When", "Water", "The city of"]
    prompts = [openings[i % len(openings)] for i in range(count)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = anchor.generate(**batch, max_new_tokens=32, do_sample=True, top_p=0.9, temperature=0.8,
                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [(p + t).strip() for p, t in zip(prompts, texts)]


def composition_data(held_in, texts, tokenizer, prompt: str):
    """The questions about held-in people (loss on the answer) and the anchor's own texts (loss on every token)."""
    questions = tokenize_records(question_records(held_in, "held-in questions", prompt), tokenizer)
    rows = [{"prompt": "", "completion": t} for t in texts]
    ordinary = tokenize_records(Records("completion", rows, list(range(1, len(rows) + 1)), "anchor texts"), tokenizer)
    return TokenizedDataset(questions.features + ordinary.features, kind="completion",
                            references=questions.references + ordinary.references)


def city_accuracy(model, tokenizer, people, prompt: str) -> float:
    """Percent of questions answered with exactly the right city (the first line of the answer)."""
    prompts = [encode_prompt(tokenizer, prompt.format(name=n)) for n, _ in people]
    answers = generate_completions(model, tokenizer, prompts, max_new_tokens=4, batch_size=16)
    right = sum(a.strip().split("\n")[0].rstrip(".") == c for a, (_, c) in zip(answers, people))
    return 100.0 * right / len(people)


def general_loss(model, tokenizer) -> float:
    records = Records(kind="text", rows=[{"text": t} for t in GENERAL], lines=list(range(1, 9)), source="general")
    return evaluate(model, tokenize_records(records, tokenizer), tokenizer, generate=False)["loss"]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="experiments/cross_tokenizer/out")
    parser.add_argument("--people", type=int, default=300, help="invented people (40%% composition, 60%% held out)")
    parser.add_argument("--prompt", choices=sorted(PROMPTS), default="statement", help="the wording SmolLM2 is asked in")
    parser.add_argument("--augment-facts", type=int, default=1, help="the most facts per augment training text")
    parser.add_argument("--augment-batch", type=int, default=32)
    parser.add_argument("--augment-steps", type=int, default=3000)
    parser.add_argument("--anchor-texts", type=int, default=96, help="SmolLM2's own texts mixed into the composition data")
    parser.add_argument("--steps", type=int, default=300, help="composition training steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    people = invented_people(args.people, args.seed)
    held_in, held_out = people[: int(0.4 * len(people))], people[int(0.4 * len(people)) :]
    phases: dict[str, tuple[float, float]] = {}

    def phase(name, started):
        phases[name] = (time.time() - started[0], cpu_seconds() - started[1])

    start = (time.time(), cpu_seconds())
    prompt = PROMPTS[args.prompt]
    augment, augment_tok, _ = train_augment(people, output / "augment", args.augment_steps, args.seed, log,
                                            args.augment_facts, args.augment_batch)
    recall = augment_recall(augment, augment_tok, held_out)
    in_question = augment_recall(augment, augment_tok, held_out, PROMPTS["question"].rstrip())
    log(f"augment recall on held-out people: {recall:.1f}% (after the question: {in_question:.1f}%)")
    phase("augment (train + check)", start)

    start = (time.time(), cpu_seconds())
    anchor, tokenizer = load_base("smollm2-135m")
    torch.manual_seed(args.seed)
    config = CompositionConfig(connections=[(3, 16), (3, 22), (3, 28)])  # the augment's last block: the city is there
    model = ComposedModel(anchor, augment, config, tokenizer=tokenizer, augment_tokenizer=augment_tok)
    log(model.summary())
    train_data = composition_data(held_in, anchor_samples(anchor, tokenizer, args.anchor_texts, args.seed), tokenizer,
                                  prompt)
    with model.disable_composition():
        alone = {"held_in": city_accuracy(model, tokenizer, held_in, prompt), "held_out": city_accuracy(model, tokenizer, held_out, prompt),
                 "general_loss": general_loss(model, tokenizer)}
    log(f"SmolLM2 alone: {alone}")
    phase("SmolLM2 alone (load + score)", start)

    start = (time.time(), cpu_seconds())
    training = TrainingConfig(max_steps=args.steps, batch_size=16, learning_rate=args.lr, warmup_steps=args.steps // 10,
                              seed=args.seed, log_every=10, cpu=True, eval_generate=False)
    result = train(model, train_data, None, training, output / "run", tokenizer=tokenizer)
    log(f"composition trained: {result.step} steps, last loss {result.train_loss:.4f}")
    phase(f"composition training ({args.steps} steps)", start)

    start = (time.time(), cpu_seconds())
    composed = {"held_in": city_accuracy(model, tokenizer, held_in, prompt), "held_out": city_accuracy(model, tokenizer, held_out, prompt),
                "general_loss": general_loss(model, tokenizer)}
    log(f"composed: {composed}")
    phase("composed (score)", start)

    rows = [
        ("SmolLM2-135M alone", alone),
        ("SmolLM2-135M + character-level augment (lmcompose)", composed),
    ]
    lines = [
        f"prompt {prompt!r}; {len(people)} invented people, {len(CITIES)} cities (chance 10%); composition trained on {len(held_in)}, "
        f"scored on {len(held_out)} held-out people; augment recall on the held-out people: {recall:.1f}% "
        f"(\"NAME lives in\"), {in_question:.1f}% (after the question)",
        "",
        "| model | held-in exact match % | held-out exact match % | loss on ordinary text |",
        "|---|---|---|---|",
        *(f"| {name} | {r['held_in']:.1f} | {r['held_out']:.1f} | {r['general_loss']:.3f} |" for name, r in rows),
        "",
        "| phase | wall s | CPU s |",
        "|---|---|---|",
        *(f"| {name} | {w:.0f} | {c:.0f} |" for name, (w, c) in phases.items()),
    ]
    table = "\n".join(lines)
    print(table)
    (output / "results.md").write_text(table + "\n", encoding="utf-8")
    (output / "results.json").write_text(json.dumps({
        "args": vars(args), "augment_recall_held_out": recall, "augment_recall_after_question": in_question, "alone": alone, "composed": composed,
        "phases": {k: {"wall_s": w, "cpu_s": c} for k, (w, c) in phases.items()},
        "trainable_parameters": sum(p.numel() for p in model.composition_parameters()),
    }, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
