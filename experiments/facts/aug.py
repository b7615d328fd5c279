"""Train a facts augment; report recall per wording and a linear probe at the name's end (LOG.md runs 1-5).

Run 2 (the same-tokenizer augment the compositions use):
    python aug.py --blocks 4 --steps 800 --batch 32 --registry 0.4 --loss city --out cache/aug4_reg
Run 5 (the character-level augment):
    python aug.py --kind char --steps 1500 --pack 256 --batch 16 --lr 3e-3 --out cache/char_all
"""
import argparse
from common import *

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--blocks", type=int, default=6)
p.add_argument("--train-from", type=int, default=0, help="train blocks >= this (lower ones frozen)")
p.add_argument("--steps", type=int, default=600)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--people", type=int, default=1000)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", default=str(CACHE / "aug"))
p.add_argument("--loss", choices=["all", "city"], default="all")
p.add_argument("--registry", type=float, default=0.0)
p.add_argument("--kind", choices=["smol", "char"], default="smol")
p.add_argument("--pack", type=int, default=0, help="pack rows of this many tokens (0: loose texts)")
p.add_argument("--char-width", type=int, default=192)
p.add_argument("--char-layers", type=int, default=4)
a = p.parse_args()
torch.set_num_threads(a.threads)
everyone = people(a.people, 0)
if a.kind == "smol":
    anchor, tok = load_smol()
    model = truncated(anchor, a.blocks)
    del anchor
    model.requires_grad_(False)
    for i, blk in enumerate(model.model.layers):
        if i >= a.train_from:
            blk.requires_grad_(True)
    model.model.norm.requires_grad_(True)
else:
    from lmcompose.testing import tiny_causal_lm
    tok = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=a.char_width, num_layers=a.char_layers,
                           num_heads=a.char_width // 32, max_positions=512, seed=0, init_std=0.02)
    a.blocks = a.char_layers
params = [q for q in model.parameters() if q.requires_grad]
log("trainable", sum(q.numel() for q in params))
city_ids = torch.tensor([tok(" " + c, add_special_tokens=False)["input_ids"][0] for c in CITIES]) if a.kind == "smol" else None
rng = random.Random(1)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / a.steps)))
emb = model.get_input_embeddings().weight if a.kind == "smol" else model.lm_head.weight
model.train()
t0 = time.time()
for step in range(a.steps):
    if a.pack:
        chars = a.pack * (5 if a.kind == "smol" else 1)
        texts = [packed_text(rng, everyone, chars, a.registry) for _ in range(a.batch)]
        enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=a.pack)
        texts = [tok.decode(row, skip_special_tokens=True) for row in enc["input_ids"]] if a.kind == "char" else texts
    else:
        texts = [augment_text(rng, everyone, a.registry) for _ in range(a.batch)]
        enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # (b, t-1, d)
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    if a.loss == "city" and a.kind == "smol":
        keep = torch.isin(tgt, city_ids)
        tgt = tgt.masked_fill(~keep, -100)
    elif a.loss == "city":  # characters of a city name: those inside a city's span
        keep = torch.zeros_like(tgt, dtype=torch.bool)
        for r, text in enumerate(texts):
            for c in CITIES:
                start = text.find(c)
                while start >= 0:
                    keep[r, start:start + len(c)] = True  # char i+1 sits at target index i (BOS at 0)
                    start = text.find(c, start + 1)
        tgt = tgt.masked_fill(~keep, -100)
    sel = tgt != -100
    logits = h[sel] @ emb.T
    loss = F.cross_entropy(logits, tgt[sel])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    if step % 50 == 0 or step == a.steps - 1:
        log(f"step {step} loss {loss.item():.3f} {time.time()-t0:.0f}s tokens/step {ids.numel()}")
model.eval()
Path(a.out).mkdir(parents=True, exist_ok=True)
model.save_pretrained(a.out); tok.save_pretrained(a.out)


@torch.no_grad()
def recall(prompt, group):
    right = 0
    for s in range(0, len(group), 64):
        chunk = group[s:s + 64]
        enc = tok([prompt.format(name=n) for n, _ in chunk], return_tensors="pt", padding=True, padding_side="left")
        logits = model(**enc).logits[:, -1]
        if a.kind == "smol":
            pred = logits.argmax(-1)
            right += sum(int(p) == tok(" " + c, add_special_tokens=False)["input_ids"][0] for p, (_, c) in zip(pred.tolist(), chunk))
        else:
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            for row, (_, c) in zip(out[:, enc["input_ids"].shape[1]:].tolist(), chunk):
                right += tok.decode(row, skip_special_tokens=True).strip().startswith(c)
    return 100 * right / len(group)


@torch.no_grad()
def last_states(prompt, group, layer):
    out = []
    for s0 in range(0, len(group), 64):
        chunk = group[s0:s0 + 64]
        enc = tok([prompt.format(name=n) for n, _ in chunk], return_tensors="pt", padding=True)
        hs = model(**enc, output_hidden_states=True).hidden_states[layer + 1]
        last = enc["attention_mask"].sum(-1) - 1
        out.append(hs[torch.arange(len(chunk)), last])
    return torch.cat(out)


def probe(fn, prompt, layer):
    xi, xo = fn(prompt, held_in, layer), fn(prompt, held_out, layer)
    mu, sd = xi.mean(0), xi.std(0) + 1e-6
    xi, xo = (xi - mu) / sd, (xo - mu) / sd
    w = torch.linalg.solve(xi.T @ xi + 10 * torch.eye(xi.shape[1]), xi.T @ F.one_hot(labels_in, 10).float())
    return ((xo @ w).argmax(-1) == labels_out).float().mean().item() * 100


@torch.no_grad()
def name_end_states(prompt, group, layer):
    """augment states at the name's last token inside prompt (b, d)."""
    out = []
    for s0 in range(0, len(group), 64):
        chunk = group[s0:s0 + 64]
        texts = [prompt.format(name=n) for n, _ in chunk]
        enc = tok(texts, return_offsets_mapping=True, return_tensors="pt", padding=True)
        hs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True).hidden_states[layer + 1]
        for r, ((n, _), text) in enumerate(zip(chunk, texts)):
            cut = text.index(n) + len(n)
            offs = enc["offset_mapping"][r].tolist()
            pos = max(i for i, (s, e) in enumerate(offs) if 0 < e <= cut)
            out.append(hs[r, pos])
    return torch.stack(out)


held_in, held_out = everyone[:300], everyone[300:600]
for name, prompt in {**DC_PROMPTS, **UNSEEN_PROMPTS}.items():
    log(f"recall {name}: held-out {recall(prompt, held_out):.1f}")
labels_in = torch.tensor([CITIES.index(c) for _, c in held_in])
labels_out = torch.tensor([CITIES.index(c) for _, c in held_out])
for layer in range(a.blocks):
    for name, prompt in {"statement": DC_PROMPTS["statement"], **UNSEEN_PROMPTS}.items():
        log(f"probe layer {layer}, {name}: name end {probe(name_end_states, prompt, layer):.1f}, "
            f"last position {probe(last_states, prompt, layer):.1f}")
