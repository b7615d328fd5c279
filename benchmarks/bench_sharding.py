"""What each rank holds, unsharded (as DDP keeps it) and under FSDP2, for SmolLM2-135M composed with its own first
4 blocks: bytes of the frozen bases' parameters, resident memory, and the seconds of one training step.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_sharding.py [--steps 3] [--tokens 64]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_sharding.py --tiny   # a check that it runs

Rank 0 prints one Markdown table with a row per (layout, rank). The step is a forward and backward of a batch of
2 rows per rank and an AdamW step of the connections; the unsharded layout all-reduces the connections' gradients
through DDP (the frozen bases kept out of it, as ``lmcompose train`` does), FSDP2 through its reduce-scatter.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch
import torch.distributed as dist

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.train import engine, sharding

from common import machine, table

HEADERS = ["layout", "rank", "bases MB held", "of the whole", "resident MB", "step s (median)"]


def resident_mb() -> float:
    """This process's resident memory now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def composed(tiny: bool) -> ComposedModel:
    """SmolLM2-135M with its first 4 blocks as the augment (connections into blocks 18, 22, 26), or tiny Llamas."""
    if tiny:
        from lmcompose.testing import tiny_causal_lm

        anchor = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, seed=0)
        augment = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, seed=1)
        return ComposedModel(anchor, augment, CompositionConfig(connections=[[1, 1], [1, 3]]))
    from lmcompose.demos.facts.augments import first_blocks
    from lmcompose.io.bases import load_base

    anchor, _ = load_base("smollm2-135m")
    return ComposedModel(anchor, first_blocks(anchor, 4), CompositionConfig(connections=[[3, 18], [3, 22], [3, 26]]))


def measure(layout: str, args: argparse.Namespace, rank: int, world: int) -> list:
    """One row of the table for this rank: build, lay out, train ``args.steps`` steps."""
    torch.manual_seed(0)
    model = composed(args.tiny)
    whole = sum(sharding.local_bytes(m) for m in (model.anchor, *model.augments))
    if layout == "FSDP2":
        wrapped = sharding.shard_model(model, torch.device("cpu"), world)
    else:
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, engine.frozen_names(model))
        wrapped = DistributedDataParallel(model)
    held = sum(sharding.local_bytes(m) for m in (model.anchor, *model.augments))
    optimizer = torch.optim.AdamW(model.composition_parameters(), lr=1e-4)
    vocab = 64 if args.tiny else 49152
    ids = torch.randint(0, vocab, (2, args.tokens), generator=torch.Generator().manual_seed(rank))
    wrapped.train()
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        wrapped(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
    dist.barrier()
    median = sorted(seconds)[len(seconds) // 2]
    row = [layout, rank, round(held / 2**20, 1), f"{held / whole:.3f}", round(resident_mb()), round(median, 2)]
    del wrapped, model, optimizer
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llamas instead of SmolLM2-135M")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for layout in ("unsharded (DDP)", "FSDP2"):  # unsharded first: its resident memory is not FSDP2's leftovers
        gathered = [None] * world
        dist.all_gather_object(gathered, measure(layout, args, rank, world))
        rows.extend(gathered)
    if rank == 0:
        print(f"{world} ranks on {machine()}; {'tiny Llamas' if args.tiny else 'SmolLM2-135M + its first 4 blocks'}, "
              f"batch 2 x {args.tokens} tokens per rank\n")
        print(table(HEADERS, rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
