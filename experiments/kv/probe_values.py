"""Exploration (run 54): how value-organised are an augment's key states?

Usage: python probe_values.py BASES... [--seed N] [--value-max V --num-keys K]  (run 54: --value-max 9 --num-keys 200)
For each bases folder: the augment's hidden states at a key's position ("<s> KEY +", every key); a ridge map to the
one-hot value fitted on the held-in keys only, scored on the held-out keys (what a composition trained on D_C can
carry over), and the fraction of the states' variance that lies between value groups.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from lmcompose.demos.kv.config import quick_config
from lmcompose.demos.kv.pipeline import load_bases
from lmcompose.demos.kv.task import KVRepository, key_text

from common import add_task_options, apply_task_options


def ridge_probe(x_fit, v_fit, x_test, v_test, classes: int) -> float:
    """Percent of ``v_test`` (0-based values) a ridge map from states to one-hot values, fitted on ``x_fit``, gets."""
    mu = x_fit.mean(0)
    xi = torch.cat([x_fit - mu, torch.ones(len(x_fit), 1)], 1)
    xo = torch.cat([x_test - mu, torch.ones(len(x_test), 1)], 1)
    w = torch.linalg.solve(xi.T @ xi + 1e-2 * torch.eye(xi.shape[1]), xi.T @ F.one_hot(v_fit, classes).float())
    return ((xo @ w).argmax(1) == v_test).float().mean().item() * 100


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bases", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    add_task_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = quick_config(args.seed)
    apply_task_options(config, args)
    repo = KVRepository(config.task)
    keys = list(repo.keys)
    values = torch.tensor([repo.values[k] for k in keys]) - 1
    held_in = torch.tensor([k in set(repo.held_in) for k in keys])
    for folder in args.bases:
        _, augment, tok = load_bases(Path(folder))
        vocab = tok.get_vocab()
        ids = torch.tensor([[tok.bos_token_id, vocab[k], vocab["+"]] for k in keys])
        with torch.no_grad():
            x = augment(ids, output_hidden_states=True).hidden_states[0][:, 1]  # (keys, D_A) embedding at the key
        probe = ridge_probe(x[held_in], values[held_in], x[~held_in], values[~held_in], repo.config.value_range)
        centred = x - x.mean(0)
        means = torch.stack([centred[values == v].mean(0) for v in values.unique()])[values]
        between = means.pow(2).sum() / centred.pow(2).sum() * 100
        parts = [f"layer 0: probe {probe:.1f}% between-value variance {between:.0f}%"]
        parts += in_context(augment, tok, repo)
        print(folder, "|", "; ".join(parts), flush=True)


def in_context(augment, tok, repo: KVRepository) -> list[str]:
    """The same probe on states at each key of three-key prompts (fitted on held-in prompts, scored on held-out)."""
    vocab = tok.get_vocab()

    def states(split: str, seed: int):
        stream = repo.expressions(split, random.Random(seed))
        exprs = [e for e in (next(stream) for _ in range(3000)) if len(e.keys) == 3][:800]
        ids = torch.tensor([[tok.bos_token_id] + [vocab[w] for w in key_text(e).split()] for e in exprs])
        with torch.no_grad():
            hs = augment(ids, output_hidden_states=True).hidden_states
        vals = torch.tensor([[repo.values[k] - 1 for k in e.keys] for e in exprs])  # (n, 3)
        return hs, vals

    (hi, vi), (ho, vo) = states("held_in", 1), states("held_out", 2)
    out = []
    for layer in range(1, len(hi)):
        accs = []
        for pos, col in ((1, 0), (3, 1), (5, 2)):
            accs.append(ridge_probe(hi[layer][:, pos], vi[:, col], ho[layer][:, pos], vo[:, col], repo.config.value_range))
        out.append(f"layer {layer} in 3-key prompts, keys 1/2/3: " + "/".join(f"{a:.1f}" for a in accs))
    return out


if __name__ == "__main__":
    main()
