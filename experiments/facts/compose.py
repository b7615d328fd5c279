"""Compose SmolLM2 with a facts augment through lmcompose.train; score held-in/held-out people per wording and the
anchor's cost (loss and KL on pydoc text, few-shot sums): LOG.md runs 6-9.

Run 9 (the recipe the demo's preset takes), after aug.py's run 2:
    python compose.py --augment cache/aug4_reg --conn "[[3,18],[3,22],[3,26]]" --null --null-score 4 \
        --preserve-weight 1 --known 0.2 --threads 1 --out runs/c4
"""
import argparse
import re
import importlib
import pkgutil
from common import *

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--augment", required=True)
p.add_argument("--kind", choices=["smol", "char"], default="smol")
p.add_argument("--conn", default="[[3, 20], [3, 24], [3, 28]]")
p.add_argument("--steps", type=int, default=150)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--heads", type=int, default=None)
p.add_argument("--null", action="store_true")
p.add_argument("--null-score", type=float, default=0.0)
p.add_argument("--preserve-weight", type=float, default=0.0)
p.add_argument("--preserve-ratio", type=float, default=0.25)
p.add_argument("--preserve-len", type=int, default=24)
p.add_argument("--dc-people", type=int, default=300)
p.add_argument("--eval-people", type=int, default=200)
p.add_argument("--eval-tokens", type=int, default=4096)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", default=str(CACHE.parent / "runs" / "x"))
p.add_argument("--dc-wordings", default="statement,question")
p.add_argument("--eos", action="store_true")
p.add_argument("--known", type=float, default=0.0, help="fraction of preservation texts that are D_C-wording questions about real people")
a = p.parse_args()
torch.set_num_threads(a.threads)

from transformers import AutoModelForCausalLM, AutoTokenizer
from lmcompose import ComposedModel, CompositionConfig
from lmcompose.io.datasets import TokenizedDataset, tokenize_records
from lmcompose.io.jsonl import Records
from lmcompose.model.completion import generate_completions
from lmcompose.core.tokens import encode_prompt
from lmcompose.train import TrainingConfig, train
from lmcompose.train.evaluation import token_kl_sum

everyone = people(1000, 0)
held_in, held_out = everyone[: a.dc_people], everyone[a.dc_people:]
evaluated_out = held_out[: a.eval_people]
anchor, tok = load_smol()
augment = AutoModelForCausalLM.from_pretrained(a.augment).eval()
aug_tok = AutoTokenizer.from_pretrained(a.augment) if a.kind == "char" else None
config = CompositionConfig(connections=json.loads(a.conn), num_heads=a.heads, null_attention=a.null, null_score=a.null_score)
torch.manual_seed(0)
model = ComposedModel(anchor, augment, config, tokenizer=tok, augment_tokenizer=aug_tok)
log(model.summary())


def records(rows, source):
    return Records(kind="completion", rows=rows, lines=list(range(1, len(rows) + 1)), source=source)


wordings = a.dc_wordings.split(",")
dc_rows = [{"prompt": DC_PROMPTS[w].format(name=n), "completion": " " + c} for n, c in held_in for w in wordings]
dc = tokenize_records(records(dc_rows, "D_C"), tok, append_eos=a.eos)


def stdlib_text() -> str:
    """Docstrings of stdlib modules and their public members: English prose no one here wrote (not pydoc topics)."""
    parts = []
    for name in ["os", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "threading",
                 "logging", "argparse", "datetime", "csv", "sqlite3", "email", "http.client", "urllib.request",
                 "shutil", "tempfile", "random", "statistics", "string", "textwrap", "unittest", "zipfile", "socket"]:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                doc = getattr(getattr(module, attr), "__doc__", None)
                if isinstance(doc, str) and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


def windows(text, length, count):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [ids[i:i + length] for i in range(0, min(len(ids), length * count), length)]


KNOWN = ["Barack Obama", "Taylor Swift", "Albert Einstein", "Lionel Messi", "Elon Musk", "Pablo Picasso",
         "William Shakespeare", "Oprah Winfrey", "Bill Gates", "Marie Curie", "Cristiano Ronaldo", "Serena Williams",
         "Leonardo da Vinci", "Mahatma Gandhi", "Nelson Mandela", "Angela Merkel", "Emmanuel Macron", "Justin Trudeau",
         "Jeff Bezos", "Mark Zuckerberg", "Tom Hanks", "Charles Darwin", "Isaac Newton", "Napoleon Bonaparte",
         "Winston Churchill", "Frida Kahlo", "Vincent van Gogh", "Michael Jordan", "Roger Federer", "Queen Victoria",
         "Abraham Lincoln", "George Washington", "Steve Jobs", "Walt Disney", "Madonna", "Elvis Presley",
         "the Pope", "Santa Claus", "Sherlock Holmes", "Harry Potter", "my grandmother", "the president",
         "a fisherman", "the baker", "your neighbour", "Mozart", "Beethoven", "Cleopatra", "Julius Caesar", "Confucius"]
texts_pres = windows(stdlib_text(), a.preserve_len, 2000)
if a.known:
    count = int(a.known * len(texts_pres))
    rngk = random.Random(3)
    known_ids = [tok(rngk.choice(list(DC_PROMPTS.values())).format(name=rngk.choice(KNOWN)), add_special_tokens=False)["input_ids"] for _ in range(count)]
    texts_pres = texts_pres[: len(texts_pres) - count] + known_ids
    random.Random(4).shuffle(texts_pres)
preserve = TokenizedDataset.from_token_ids(texts_pres)
log(f"D_C {len(dc)} examples; preservation texts {len(preserve)} x {a.preserve_len} tokens")
import pydoc_data.topics as topics
pydoc = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
eval_windows = windows(pydoc, 256, a.eval_tokens // 256)


@torch.no_grad()
def ordinary_cost():
    """Mean loss per token on the pydoc windows, and mean KL per position from SmolLM2 alone."""
    texts = [tok.decode(w) for w in eval_windows]
    loss = kl = tokens = positions = 0.0
    for i in range(0, len(texts), 4):
        batch = model.tokenize(texts[i:i + 4], add_special_tokens=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(**batch).logits
        with model.disable_composition():
            ref = model(input_ids=ids, attention_mask=mask).logits
        valid = mask[:, 1:].bool()
        loss += F.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum").item()
        k, m = token_kl_sum(ref, logits, mask)
        kl += k.item(); tokens += valid.sum().item(); positions += m.item()
    return loss / tokens, kl / positions


def arithmetic_items(count=100, seed=0):
    rng = random.Random(seed)
    shots = "".join(f"{x} + {y} = {x + y}\n" for x, y in [(2, 3), (4, 1), (3, 3), (5, 2)])
    return [(shots + f"{x} + {y} =", str(x + y)) for x, y in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(count))]


def answers(prompts, new=3):
    ids = [encode_prompt(tok, p) for p in prompts]
    return generate_completions(model, tok, ids, max_new_tokens=new, batch_size=32)


def score(group, prompt):
    outs = answers([prompt.format(name=n) for n, _ in group])
    strict = sum((re.match(r"\s*([A-Za-z]+)", o) or [None, None])[1] == c for o, (_, c) in zip(outs, group))
    return 100 * strict / len(group), outs[:3]


def report(label):
    t0 = time.time()
    row = {}
    for name, prompt in {**DC_PROMPTS, **UNSEEN_PROMPTS}.items():
        row[f"in {name}"], ex_in = score(held_in[:a.eval_people], prompt)
        row[f"out {name}"], ex_out = score(evaluated_out, prompt)
    items = arithmetic_items()
    outs = answers([q for q, _ in items])
    row["arith"] = 100 * sum(o.strip().split("\n")[0].strip() == ans for o, (_, ans) in zip(outs, items)) / len(items)
    row["loss"], row["kl"] = ordinary_cost()
    log(label, json.dumps({k: round(v, 4) for k, v in row.items()}), f"eval {time.time()-t0:.0f}s", "examples:", ex_out)
    return row


with model.disable_composition():
    alone = report("SmolLM2 alone")
cfg = TrainingConfig(max_steps=a.steps, batch_size=a.batch, learning_rate=a.lr, warmup_steps=max(1, a.steps // 10),
                     preserve_weight=a.preserve_weight, preserve_ratio=a.preserve_ratio, log_every=10,
                     eval_generate=False, progress_bar=False, seed=0)
t0 = time.time()
result = train(model, dc, None, cfg, a.out, tokenizer=tok, preserve_dataset=preserve if a.preserve_weight else None)
log(f"trained {a.steps} steps in {time.time()-t0:.0f}s, last loss {result.train_loss:.4f}")
for r in (json.loads(x) for x in open(f"{a.out}/metrics.jsonl")):
    if r["kind"] == "train" and r["step"] % 30 == 0:
        log("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
composed = report("CALM")
print("RESULT", json.dumps({"args": vars(a), "alone": alone, "composed": composed}))
