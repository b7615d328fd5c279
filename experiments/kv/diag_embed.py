"""Exploration (run 45): where the preset's CALM fails on three-operand expressions.

Trains (or loads) the pipeline's CALM row on cached bases, then on held-out KV-MATH, per operand count:
- substitution: does the update written into the embeddings (anchor layer -1) turn each key's <unk> embedding into
  its value's embedding? Nearest number embedding to (embedding + update) at every key position;
- attention: the weight the embedding connection puts on the key's own position;
- oracle: the composed model with each key's embedding set to its value's embedding plus the learned update;
- robustness: the anchor alone on NUM-MATH with its training noise (0.5 x RMS) on its embeddings.

Usage: python diag_embed.py BASES [--connections JSON] [--state FILE.pt]
Run 45: the bases of run 42 with --connections "[[1,-1],[0,0],[1,1]]" (the preset of then). --state loads the
composition from FILE.pt when it exists, else trains it and saves it there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmcompose import ComposedModel
from lmcompose.core.cross_attention import apply_rotary
from lmcompose.demos.kv.config import quick_config
from lmcompose.demos.kv.pipeline import composition_config, composition_data, embedding_noise, load_bases
from lmcompose.demos.kv.task import KVRepository
from lmcompose.demos.kv.training import batches
from lmcompose.train.base_training import train_loop

from common import collate, encode, teacher_forced_accuracy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bases")
    ap.add_argument("--connections", default=None, help="JSON (augment, anchor) pairs; the first must be (i, -1)")
    ap.add_argument("--state", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = quick_config()
    if args.connections:
        config.connections = json.loads(args.connections)
    anchor, augment, tok = load_bases(Path(args.bases))
    repo = KVRepository(config.task)
    torch.manual_seed(config.seed)
    model = ComposedModel(anchor, augment, composition_config(config))
    if args.state and Path(args.state).exists():
        model.connections.load_state_dict(torch.load(args.state))
    else:
        model.train()
        data = batches(composition_data(repo, config.num_math_mix), tok, config.batch_size, config.seed + 13)
        train_loop(model.composition_parameters(), lambda b: model(**b).loss, data, config.compose_steps,
                   config.compose_lr, print)
        if args.state:
            torch.save(model.connections.state_dict(), args.state)
    model.eval()
    vocab, bos, eos, pad = tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    numbers = torch.tensor([vocab[str(v)] for v in range(1, 10)])
    emb_table = anchor.get_input_embeddings().weight.detach()
    emb_numbers = emb_table[numbers]  # (9, D_B)
    exprs = repo.evaluation_expressions()
    conn = model.connections[0][0]  # (1, -1): into the embeddings
    for n in (2, 3):
        group = [e for e in exprs if len(e.keys) == n]
        pairs = [encode(vocab, repo.kv_math(e), bos, eos) for e in group]
        num_pairs = [encode(vocab, repo.num_math(e), bos, eos) for e in group]
        b = collate(pairs, pad)
        ids = b["input_ids"]
        key_pos = torch.tensor([1 + 2 * i for i in range(n)])  # <s> k1 op k2 op k3 =
        values = torch.tensor([repo.operand_values(e) for e in group])  # (N, n)
        with torch.no_grad():
            positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
            states = model.augment_hidden(0, ids, None, positions)
            kv = model.project(0, states, positions)
            emb = anchor.get_input_embeddings()(ids)
            delta = conn(emb, *kv[0], None, positions)
            x = (emb + delta)[:, key_pos]  # (N, n, D)
            dist = torch.cdist(x.reshape(-1, x.shape[-1]), emb_numbers).reshape(len(group), n, 9)
            nearest = dist.argmin(-1) + 1
            ok = nearest == values
            # attention weights of the embedding connection, averaged over heads, at key positions
            q = conn._heads(conn.query(conn.anchor_norm(emb)))
            q = apply_rotary(q, positions)
            k = kv[0][0]
            att = torch.softmax((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
                                + torch.full((ids.shape[1],) * 2, float("-inf")).triu(1), -1)  # (N, h, t, s)
            own = torch.stack([att[:, :, p, p] for p in key_pos], -1).mean(1)  # (N, n)
            gap = (x - emb_numbers[values - 1]).norm(dim=-1) / emb_numbers[values - 1].norm(dim=-1)
        print(f"{n} operands ({len(group)} expressions): composed KV-MATH {teacher_forced_accuracy(model, pairs, pad):.1f}%")
        print(f"  nearest number embedding = value at key position: {100 * ok.float().mean():.1f}% of keys, "
              f"all keys of the expression {100 * ok.all(1).float().mean():.1f}%; per slot "
              f"{[round(100 * ok[:, i].float().mean().item(), 1) for i in range(n)]}")
        print(f"  relative distance |x - e(value)| / |e(value)| per slot: {[round(gap[:, i].mean().item(), 3) for i in range(n)]}")
        print(f"  attention on own position per slot (mean over heads): {[round(own[:, i].mean().item(), 3) for i in range(n)]}")
        # accuracy restricted to expressions whose substitution is right
        right = [p for p, good in zip(pairs, ok.all(1).tolist()) if good]
        wrong = [p for p, good in zip(pairs, ok.all(1).tolist()) if not good]
        print(f"  KV-MATH where every key's nearest is right: {teacher_forced_accuracy(model, right, pad) if right else 0:.1f}% "
              f"({len(right)}), where one is wrong: {teacher_forced_accuracy(model, wrong, pad) if wrong else 0:.1f}% ({len(wrong)})")
        with model.disable_composition():
            print(f"  anchor alone NUM-MATH {teacher_forced_accuracy(model, num_pairs, pad):.1f}%")
            embeddings = anchor.get_input_embeddings().train()  # the noise hook acts in training mode only
            for scale in (0.25, 0.5):
                h = embedding_noise(anchor, scale, seed=0)
                print(f"  anchor alone NUM-MATH with noise {scale}: {teacher_forced_accuracy(model, num_pairs, pad):.1f}%")
                h.remove()
            embeddings.eval()
        # oracle: the composed model reading the value's embedding (plus the update) at key positions
        def oracle(module, a, out, values=values, key_pos=key_pos):
            out = out.clone()
            for i, p in enumerate(key_pos):
                out[:, p] = emb_table[numbers[values[:, i] - 1]]
            return out
        h = anchor.get_input_embeddings().register_forward_hook(oracle)
        print(f"  composed with value embeddings at key positions: {teacher_forced_accuracy(model, pairs, pad, batch=10000):.1f}%")
        h.remove()


if __name__ == "__main__":
    main()
