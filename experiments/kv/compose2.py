"""Exploration (runs 16+): compose.py with more knobs: out-projection lr multiplier, rotary theta, warm-up, batch.

Same data and evaluation as compose.py (teacher-forced exact match on 500 held-in / 500 held-out KV-MATH and
500 NUM-MATH expressions; equals greedy exact match).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time

import torch
from transformers import AutoModelForCausalLM

import lmcompose.cross_attention as xa
from common import encode, exact_match, stream
from lmcompose import ComposedModel, CompositionConfig
from lmcompose.tasks.kv import KVRepository, KVTaskConfig, build_tokenizer, num_math_example


def sink_forward(self, anchor_hidden, keys, values, mask=None, positions=None):
    """CrossAttention.forward with one extra all-zero key/value slot (attending it adds nothing)."""
    b, t, dim = anchor_hidden.shape
    q = self._heads(self.query(self.anchor_norm(anchor_hidden)))
    if self.rotary:
        q = xa.apply_rotary(q, positions)
    s = keys.shape[2]
    if mask is None:
        mask = torch.ones(t, s, dtype=torch.bool).tril()[None, None].expand(b, 1, t, s)
    zero = keys.new_zeros(b, keys.shape[1], 1, keys.shape[3])
    k, v = torch.cat([zero, keys], 2), torch.cat([zero, values], 2)
    m = torch.cat([mask.new_ones(mask.shape[0], 1, mask.shape[2], 1), mask], -1)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return self.out(y.transpose(1, 2).reshape(b, t, dim))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", default="cache/anchor_d9")
    ap.add_argument("--augment", default="cache/augment_d9")
    ap.add_argument("--connections", default="[[0,0],[1,1],[1,2]]")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--num-mix", type=float, default=0.3)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--theta", type=float, default=10000.0, help="rotary base of the cross-attention")
    ap.add_argument("--out-lr", type=float, default=1.0, help="lr multiplier of the output projections W^O")
    ap.add_argument("--warm", type=float, default=0.05, help="warm-up fraction")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--value-max", type=int, default=9)
    ap.add_argument("--num-keys", type=int, default=200)
    ap.add_argument("--min-ops", type=int, default=2)
    ap.add_argument("--max-ops", type=int, default=3)
    ap.add_argument("--entry-block", type=int, default=0,
                    help="prepend an identity block to the anchor: anchor layer 0 is then the embeddings")
    ap.add_argument("--sink", type=int, default=0, help="a zero key/value slot every query may attend to")
    ap.add_argument("--shared-keys", type=int, default=0, help="set every key's anchor embedding to <unk>'s")
    ap.add_argument("--zero-keys", type=int, default=0, help="set the anchor's (never trained) key embeddings to 0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sink:
        xa.CrossAttention.forward = sink_forward
    if args.theta != 10000.0:
        xa.apply_rotary = functools.partial(xa.apply_rotary, theta=args.theta)
    repo = KVRepository(KVTaskConfig(num_keys=args.num_keys, value_max=args.value_max, min_operands=args.min_ops,
                                      max_operands=args.max_ops, seed=0))
    tok = build_tokenizer(repo)
    vocab, bos, eos, pad = tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    anchor = AutoModelForCausalLM.from_pretrained(args.anchor).eval()
    augment = AutoModelForCausalLM.from_pretrained(args.augment).eval()
    if args.shared_keys:  # every key reads as the anchor's <unk>: the anchor cannot tell keys apart
        with torch.no_grad():
            emb = anchor.get_input_embeddings().weight
            emb[[vocab[k] for k in repo.keys]] = emb[tok.unk_token_id].clone()
    if args.zero_keys:
        with torch.no_grad():
            anchor.get_input_embeddings().weight[[vocab[k] for k in repo.keys]] = 0.0
    if args.entry_block:
        from surgery import with_entry_block
        anchor = with_entry_block(anchor)
    torch.manual_seed(args.seed)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=json.loads(args.connections), rotary=True,
                                                             num_heads=args.heads))
    held_in = repo.expressions("held_in", random.Random(3))
    numbers = repo.random_numbers(random.Random(4))

    def make(rng):
        if rng.random() < args.num_mix:
            return num_math_example(*next(numbers))
        return repo.kv_math(next(held_in))

    ev = repo.evaluation_expressions()
    kv_out = [encode(vocab, repo.kv_math(e), bos, eos) for e in ev]
    num = [encode(vocab, repo.num_math(e), bos, eos) for e in ev]
    rin = repo.expressions("held_in", random.Random(5))
    kv_in = [encode(vocab, repo.kv_math(next(rin)), bos, eos) for _ in range(500)]

    def report():
        model.eval()
        def kind(e):
            a = repo.kv_math(e).target
            return f"{len(e.keys)}ops-" + ("neg" if a.startswith("-") else f"{len(a.split())}d")

        kinds = sorted({kind(e) for e in ev})
        by_kind = " ".join(f"{k}:{exact_match(model, [p for p, e in zip(kv_out, ev) if kind(e) == k], pad):.0f}"
                           f"/{sum(kind(e) == k for e in ev)}" for k in kinds)
        by_ops = by_kind + " " + " ".join(f"{n}ops {exact_match(model, [p for p, e in zip(kv_out, ev) if len(e.keys) == n], pad):.1f}%"
                          for n in sorted({len(e.keys) for e in ev}))
        r = (f"KV-MATH in {exact_match(model, kv_in, pad):.1f}% out {exact_match(model, kv_out, pad):.1f}% "
             f"({by_ops}) NUM {exact_match(model, num, pad):.1f}%")
        model.train()
        return r

    with model.disable_composition():
        print(f"anchor alone: NUM {exact_match(model, num, pad):.1f}% KV-MATH out {exact_match(model, kv_out, pad):.1f}%",
              model.summary(), flush=True)
    params = model.composition_parameters()
    outs = [p for n, p in model.connections.named_parameters() if n.endswith("out.weight")]
    rest = [p for p in params if all(p is not q for q in outs)]
    opt = torch.optim.AdamW([{"params": rest, "lr": args.lr}, {"params": outs, "lr": args.lr * args.out_lr}],
                            betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, int(args.steps * args.warm))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    data = stream(make, vocab, bos, eos, pad, args.batch, args.seed + 10)
    model.train()
    start, running = time.time(), None
    for step in range(1, args.steps + 1):
        loss = model(**next(data)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"  step {step:5d} loss {running:.4f} {time.time() - start:6.1f}s {report()}", flush=True)
    print(f"RESULT compose2 {vars(args)} {report()} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
