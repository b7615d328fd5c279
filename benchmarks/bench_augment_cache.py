"""Per-epoch training time with and without the augment-state cache (median of interleaved runs).

The augment is larger than the anchor, the case the cache is for: without it every epoch runs the
frozen augment over every example again; with it the augment runs once, before the first epoch.

    .venv/bin/python benchmarks/bench_augment_cache.py [--examples 128] [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from lmcompose import ComposedModel
from lmcompose.io.datasets import TokenizedDataset
from lmcompose.testing import tiny_causal_lm
from lmcompose.train.recipe import TrainingConfig, train
from lmcompose.train.run_log import read_metrics

VOCAB = 256


def bases(device: str):
    anchor = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, seed=1)
    augment = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=256, num_layers=8, num_heads=8, seed=2)
    return anchor.to(device), augment.to(device)


def data(examples: int, min_len: int, max_len: int) -> TokenizedDataset:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (examples,), generator=gen).tolist()
    return TokenizedDataset.from_token_ids([torch.randint(3, VOCAB, (t,), generator=gen).tolist() for t in lengths])


def one_run(anchor, augment, dataset, cached: bool, args, root: Path) -> tuple[list[float], float | None]:
    """Train ``args.epochs`` epochs; returns the seconds of each epoch and of building the cache."""
    torch.manual_seed(0)
    model = ComposedModel(anchor, augment)  # paper default: n = 8 // 4 = 2 connections, augment layers 3 and 7
    config = TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        log_every=10_000,
        progress_bar=False,
        cache_augment_states=cached,
        cpu=args.device == "cpu",
    )
    output = root / f"{'cache' if cached else 'plain'}"
    train(model, dataset, None, config, output)
    records = read_metrics(output / "metrics.jsonl")
    epochs = [r["seconds"] for r in records if r["kind"] == "epoch"]
    build = next((r["seconds"] for r in records if r["kind"] == "cache"), None)
    return epochs, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=128, help="training examples")
    parser.add_argument("--min-length", type=int, default=48, help="shortest example (tokens)")
    parser.add_argument("--max-length", type=int, default=96, help="longest example (tokens)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    anchor, augment = bases(args.device)
    dataset = data(args.examples, args.min_length, args.max_length)
    times: dict[bool, list[float]] = {False: [], True: []}
    builds: list[float] = []
    for repeat in range(args.repeats):
        for cached in ((False, True) if repeat % 2 == 0 else (True, False)):  # interleaved, alternating first
            with tempfile.TemporaryDirectory() as tmp:
                epochs, build = one_run(anchor, augment, dataset, cached, args, Path(tmp))
            times[cached] += epochs
            if build is not None:
                builds.append(build)

    tokens = sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
    device = args.device if args.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"augment-state cache: anchor llama 2 layers x 64, augment llama 8 layers x 256; {args.examples} examples "
        f"({tokens} tokens), batch {args.batch_size}; {args.epochs} epochs x {args.repeats} interleaved runs per mode ({device})"
    )
    plain = statistics.median(times[False])
    header = f"{'mode':<10} {'cache build s':>14} {'epoch median s':>15} {'epoch min s':>12} {'speed-up':>9} {f'{args.epochs} epochs + build s':>22}"
    print(header)
    print("-" * len(header))
    for cached in (False, True):
        median = statistics.median(times[cached])
        build = statistics.median(builds) if cached else 0.0
        print(
            f"{'cache' if cached else 'no cache':<10} {(f'{build:.3f}' if cached else '-'):>14} {median:>15.3f} "
            f"{min(times[cached]):>12.3f} {plain / median:>8.2f}x {args.epochs * median + build:>22.3f}"
        )


if __name__ == "__main__":
    main()
