"""Where a composition's KL from SmolLM2 concentrates on pydoc text: by position, and the worst tokens (LOG.md, the
paragraph after run 8).

    python kl_where.py cache/aug4_reg runs/c3/run/composition
"""
import argparse
import sys

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("augment", help="the augment's model directory")
p.add_argument("composition", help="the composition directory compose.py wrote")
args = p.parse_args()
sys.argv[1:] = [args.augment, args.composition]
from common import *
from transformers import AutoModelForCausalLM
from lmcompose import ComposedModel
torch.set_num_threads(2)
anchor, tok = load_smol()
augment = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
model = ComposedModel.from_composition(sys.argv[2], anchor, augment, tokenizer=tok)
import pydoc_data.topics as topics
text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
ids = tok(text, add_special_tokens=False)["input_ids"][:2048]
kls = []
with torch.no_grad():
    for s in range(0, 2048, 256):
        x = torch.tensor([ids[s:s + 256]])
        lp = model(x).logits.log_softmax(-1)
        with model.disable_composition():
            la = model(x).logits.log_softmax(-1)
        kls.append((la.exp() * (la - lp)).sum(-1)[0])
kl = torch.cat(kls)
print("mean", kl.mean().item(), "median", kl.median().item(), "share of the top 1%:", kl.sort(descending=True)[0][:20].sum().item() / kl.sum().item())
print("by position in window:", [round(kl.view(8, 256)[:, a:a + 32].mean().item(), 4) for a in range(0, 256, 32)])
for i in kl.argsort(descending=True)[:15].tolist():
    context = tok.decode(ids[max(0, i - 6):i + 1]).replace("\n", "\\n")
    print(f"{kl[i].item():.2f}  ...{context!r} -> next {tok.decode([ids[i + 1]]) if i + 1 < len(ids) else ''!r}")
