"""Helpers of the facts experiments (runs 1-9 of LOG.md): invented people, their cities, SmolLM2 and its first
blocks, a character tokenizer. Models and runs go under ``FACTS_CACHE`` (default: ``cache/`` beside this file)."""
import os, random, time, math, sys, json
from pathlib import Path
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch
import torch.nn.functional as F

CACHE = Path(os.environ.get("FACTS_CACHE", Path(__file__).parent / "cache"))

# the demo's people, cities and records are these runs' (the same names for the same seed)
from lmcompose.demos.facts.augments import char_tokenizer  # noqa: E402,F401  (the character augment's tokenizer)
from lmcompose.demos.facts.task import CITIES, FactsTask, FactsTaskConfig  # noqa: E402
from lmcompose.demos.facts.task import RECORDS as REGISTRY  # noqa: E402  (the city right after the name)
AUG_TEMPLATES = [
    "{name} lives in {city}.",
    "{name} has a home in {city}.",
    "{city} is where {name} lives.",
    "{name} moved to {city} years ago.",
    "{name}, who lives in {city}, works from home.",
    "The home of {name} is in {city}.",
    "{name} of {city} wrote a letter.",
]
FILLERS = ["The weather was mild that day.", "Many people enjoy long walks.", "A new bakery opened last week.",
           "The train was late again.", "Music filled the small room.", "Everyone agreed on the plan."]
DC_PROMPTS = {"statement": "{name} lives in", "question": "Q: Where does {name} live?\nA:"}
UNSEEN_PROMPTS = {"which_city": "Q: Which city is {name}'s home?\nA:",
                  "reside": "Question: In what city does {name} reside?\nAnswer:"}


def people(n, seed):
    """``n`` invented people as (name, city), in the order of :class:`FactsTask` (cities balanced)."""
    return [(p.name, p.city) for p in FactsTask(FactsTaskConfig(num_people=n, seed=seed)).people]


def augment_text(rng, everyone, registry=0.0):
    """1-3 facts, sometimes with filler sentences around; with probability ``registry`` a list of name-city records."""
    if rng.random() < registry:
        rows = [rng.choice(REGISTRY).format(name=n, city=c) for n, c in rng.sample(everyone, rng.randint(2, 4))]
        return rng.choice(["Residents: ", "Directory: ", ""]) + "; ".join(rows) + "."
    parts = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.3:
            parts.append(rng.choice(FILLERS))
        nm, c = rng.choice(everyone)
        parts.append(rng.choice(AUG_TEMPLATES).format(name=nm, city=c))
    return " ".join(parts)


def load_smol():
    from lmcompose.io.bases import load_base
    cache = CACHE / "smollm2"
    if (cache / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return AutoModelForCausalLM.from_pretrained(cache).eval(), AutoTokenizer.from_pretrained(cache)
    from transformers import AutoModelForCausalLM
    m, tok = load_base("smollm2-135m")
    plain = AutoModelForCausalLM.from_config(m.config)
    plain.load_state_dict(m.state_dict())
    plain.save_pretrained(cache); tok.save_pretrained(cache)
    return plain.eval(), tok


def truncated(model, n):
    """SmolLM2's first n blocks with its norm and (tied) head."""
    from transformers import AutoModelForCausalLM
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_hidden_layers = n
    cfg.layer_types = None if not hasattr(cfg, "layer_types") else cfg.layer_types[:n] if cfg.layer_types else None
    small = AutoModelForCausalLM.from_config(cfg)
    sd = {k: v for k, v in model.state_dict().items()
          if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    missing, unexpected = small.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing
    small.tie_weights()
    return small.eval()


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def fact_piece(rng, everyone, registry=0.5):
    """One piece of augment training text: a registry run of 2-4 name-city records, a fact sentence, or a filler."""
    r = rng.random()
    if r < registry:
        rows = [rng.choice(REGISTRY).format(name=n, city=c) for n, c in rng.sample(everyone, rng.randint(2, 4))]
        return "; ".join(rows) + "."
    if r < registry + 0.05:
        return rng.choice(FILLERS)
    nm, c = rng.choice(everyone)
    return rng.choice(AUG_TEMPLATES).format(name=nm, city=c)


def packed_text(rng, everyone, chars, registry=0.5):
    """Pieces joined by spaces or newlines until the text has at least ``chars`` characters."""
    text = fact_piece(rng, everyone, registry)
    while len(text) < chars:
        text += rng.choice([" ", " ", "\n"]) + fact_piece(rng, everyone, registry)
    return text
