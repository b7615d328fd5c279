"""Diagnostic: can a linear map fitted on held-in keys carry the augment's key state to the anchor's number embedding?"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

from lmcompose.tasks.kv import KVRepository, KVTaskConfig, build_tokenizer

torch.set_num_threads(1)
anchor = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
augment = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
repo = KVRepository(KVTaskConfig())
tok = build_tokenizer(repo)
vocab = tok.get_vocab()
keys = list(repo.keys)
ids = torch.tensor([[tok.bos_token_id, vocab[k], vocab["+"]] for k in keys])
values = torch.tensor([repo.values[k] for k in keys])
held_in = torch.tensor([k in set(repo.held_in) for k in keys])
with torch.no_grad():
    hs = augment(ids, output_hidden_states=True).hidden_states  # embeddings, block 0, block 1, ...
    emb = anchor.get_input_embeddings().weight[torch.tensor([vocab[str(v)] for v in range(1, 101)])]  # (100, D_B)
target = emb[values - 1]
for layer, h in enumerate(hs):
    x = h[:, 1]  # key position
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    for lam in (1e-3, 1e-1, 1.0):
        xi, yi = x[held_in], target[held_in]
        w = torch.linalg.solve(xi.T @ xi + lam * torch.eye(x.shape[1]), xi.T @ yi)
        pred = x[~held_in] @ w
        nn = torch.cdist(pred, emb).argmin(1) + 1
        v = values[~held_in]
        acc = (nn == v).float().mean() * 100
        tens = (nn // 10 == v // 10).float().mean() * 100
        ones = (nn % 10 == v % 10).float().mean() * 100
        print(f"hidden_states[{layer}] lam {lam}: held-out value {acc:.1f}% tens {tens:.1f}% ones {ones:.1f}%")


def digit_structure(rep: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor, lam: float = 0.1) -> str:
    """Fit rep -> one-hot(tens) ++ one-hot(ones) on ``mask`` values; digit accuracy on the others."""
    y = torch.cat([torch.nn.functional.one_hot(vals // 10 % 10, 10), torch.nn.functional.one_hot(vals % 10, 10)], 1).float()
    x = torch.cat([rep, torch.ones(len(rep), 1)], 1)
    w = torch.linalg.solve(x[mask].T @ x[mask] + lam * torch.eye(x.shape[1]), x[mask].T @ y[mask])
    p = x[~mask] @ w
    v = vals[~mask]
    t = (p[:, :10].argmax(1) == v // 10 % 10).float().mean() * 100
    o = (p[:, 10:].argmax(1) == v % 10).float().mean() * 100
    return f"tens {t:.0f}% ones {o:.0f}%"


print("anchor number embeddings:", digit_structure(emb[values - 1], values, held_in))
for layer, h in enumerate(hs):
    print(f"augment hidden_states[{layer}] at key:", digit_structure(h[:, 1], values, held_in))
