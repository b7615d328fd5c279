"""Linear probes of a character-level augment's states at offsets around the name's end, per wording (fitted on
held-in people, scored on held-out ones): LOG.md run 5's probe column and run 12's. Offset +0 is the name's last
character, +1 the one after it ("'" in "NAME's home"), +3 the space after "'s".

    python probe_char.py cache/char_all
"""
import argparse
import sys

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("augment", help="the character-level augment's model directory (aug.py --kind char)")
sys.argv[1:] = [p.parse_args().augment]
from common import *
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = char_tokenizer()
everyone = people(1000, 0)
held_in, held_out = everyone[:300], everyone[300:600]
li = torch.tensor([CITIES.index(c) for _, c in held_in]); lo = torch.tensor([CITIES.index(c) for _, c in held_out])
wordings = {"statement": "{name} lives in", "which_city": "Q: Which city is {name}'s home?\nA:",
            "reside": "Question: In what city does {name} reside?\nAnswer:", "records": "Residents: {name} "}

@torch.no_grad()
def states(prompt, group, offset, layer):
    texts = [prompt.format(name=n) for n, _ in group]
    enc = tok(texts, return_tensors="pt", padding=True)
    hs = model(**enc, output_hidden_states=True).hidden_states[layer + 1]
    rows = []
    for r, ((n, _), text) in enumerate(zip(group, texts)):
        end = text.index(n) + len(n)  # char index after the name; token index = char index + 1 (BOS)
        rows.append(hs[r, min(end + offset, len(text))])
    return torch.stack(rows)

for name, prompt in wordings.items():
    for layer in (1, 3):
        out = []
        for offset in (0, 1, 2, 3):
            xi, xo = states(prompt, held_in, offset, layer), states(prompt, held_out, offset, layer)
            mu, sd = xi.mean(0), xi.std(0) + 1e-6
            xi, xo = (xi - mu) / sd, (xo - mu) / sd
            w = torch.linalg.solve(xi.T @ xi + 10 * torch.eye(xi.shape[1]), xi.T @ F.one_hot(li, 10).float())
            out.append(f"+{offset}: {((xo @ w).argmax(-1) == lo).float().mean().item() * 100:.0f}")
        print(name, "layer", layer, " ".join(out), flush=True)
