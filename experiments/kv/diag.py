"""Diagnostic: is replacing the anchor's block-j output at the operand positions enough to recover NUM-MATH?"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

from common import collate, encode
from lmcompose.tasks.kv import KVRepository, KVTaskConfig, build_tokenizer

torch.set_num_threads(1)
anchor = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
repo = KVRepository(KVTaskConfig())
tok = build_tokenizer(repo)
vocab, bos, eos, pad = tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
ev = repo.evaluation_expressions()
num = collate([encode(vocab, repo.num_math(e), bos, eos) for e in ev], pad)
kv = collate([encode(vocab, repo.kv_math(e), bos, eos) for e in ev], pad)
operand = torch.zeros_like(num["input_ids"], dtype=torch.bool)
for r, e in enumerate(ev):
    for k in range(len(e.keys)):
        operand[r, 1 + 2 * k] = True
blocks = anchor.model.layers


def em(batch, logits):
    pred = logits[:, :-1].argmax(-1)
    gold = batch["labels"][:, 1:]
    return 100 * ((pred == gold) | (gold == -100)).all(1).float().mean().item()


with torch.no_grad():
    for j in range(len(blocks)):
        saved = {}
        h = blocks[j].register_forward_hook(lambda m, a, o: saved.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        anchor(input_ids=num["input_ids"], attention_mask=num["attention_mask"])
        h.remove()
        for mode in ("operand", "all"):
            sel = operand if mode == "operand" else num["attention_mask"].bool()

            def patch(m, a, o):
                x = o[0] if isinstance(o, tuple) else o
                x = torch.where(sel[..., None], saved["h"], x)
                return (x, *o[1:]) if isinstance(o, tuple) else x

            h = blocks[j].register_forward_hook(patch)
            out = anchor(input_ids=kv["input_ids"], attention_mask=kv["attention_mask"])
            h.remove()
            print(f"patch after block {j} at {mode} positions: KV-MATH {em(kv, out.logits):.1f}%")
