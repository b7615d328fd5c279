"""What each rank holds, unsharded (as DDP keeps it), under FSDP2 and under DeepSpeed ZeRO-3, for SmolLM2-135M
composed with its own first 4 blocks: bytes of the frozen bases' parameters, peak resident memory, and the seconds
of one training step.

    OMP_NUM_THREADS=1 python benchmarks/bench_sharding.py [--ranks 2] [--steps 3] [--tokens 64]
    OMP_NUM_THREADS=1 python benchmarks/bench_sharding.py --tiny   # a check that it runs

The bases are written once as model directories; each layout then runs in a launch of its own (`torchrun`, one
process per rank), so a rank's peak resident memory is that layout's alone:
- "unsharded (DDP)": every rank loads the bases whole; DDP all-reduces the connections' gradients (the frozen bases
  kept out of it, as ``lmcompose train`` does);
- "FSDP2, loaded whole": every rank loads the bases whole, then shards them;
- "FSDP2, ranks > 0 built empty": what ``lmcompose train --sharding fsdp2`` does: rank 0 loads the bases whole,
  the others build them on the meta device and receive their shards from rank 0;
- "DeepSpeed ZeRO-3": what ``lmcompose train --sharding zero3`` does: every rank loads the bases whole, then
  ``deepspeed.initialize`` partitions every parameter (skipped when DeepSpeed is not installed).
The step is a forward and backward of a batch of 2 rows per rank and an AdamW step of the connections. Peak
resident memory is the process's maximum (``getrusage``) after the model is built and laid out, then after the steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch

from common import machine, table

HEADERS = ["layout", "rank", "bases MB held", "of the whole", "peak resident MB, built and laid out",
           "peak resident MB, after the steps", "step s (median)"]
LAYOUTS = ("unsharded (DDP)", "FSDP2, loaded whole", "FSDP2, ranks > 0 built empty", "DeepSpeed ZeRO-3")


def peak_mb() -> float:
    """This process's peak resident memory so far (Linux reports it in KiB), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_bases(folder: Path, tiny: bool) -> None:
    """Write the anchor and the augment as model directories: SmolLM2-135M and its first 4 blocks, or tiny Llamas."""
    if tiny:
        from lmcompose.testing import tiny_causal_lm

        tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, seed=0).save_pretrained(
            folder / "anchor")
        tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, seed=1).save_pretrained(
            folder / "augment")
        return
    from lmcompose.demos.facts.augments import first_blocks
    from lmcompose.demos.facts.rows import save_anchor
    from lmcompose.io.bases import load_base

    save_anchor(folder / "anchor")  # SmolLM2's GGUF dequantised, as a model directory
    first_blocks(load_base(folder / "anchor", with_tokenizer=False)[0], 4).save_pretrained(folder / "augment")


def rank_row(layout: str, args: argparse.Namespace) -> list:
    """One rank's row of the table (run under torchrun): build, lay out, train ``args.steps`` steps."""
    import torch.distributed as dist

    from lmcompose import ComposedModel, CompositionConfig
    from lmcompose.io.bases import load_base
    from lmcompose.train import engine, sharding

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    empty = layout == LAYOUTS[2] and rank > 0
    anchor, _ = load_base(args.folder / "anchor", with_tokenizer=False, empty=empty)
    augment, _ = load_base(args.folder / "augment", with_tokenizer=False, empty=empty)
    model = ComposedModel(anchor, augment, CompositionConfig(
        connections=[[1, 1], [1, 3]] if args.tiny else [[3, 18], [3, 22], [3, 26]]))
    whole = sum(p.numel() * p.element_size() for m in (model.anchor, *model.augments) for p in m.parameters())
    if layout == LAYOUTS[0]:
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, engine.frozen_names(model))
        wrapped = DistributedDataParallel(model)
    elif layout == LAYOUTS[3]:
        from types import SimpleNamespace

        from lmcompose.train import zero3

        optimizer = torch.optim.AdamW(model.composition_parameters(), lr=1e-4)
        wrapped, optimizer = zero3.initialize(model, optimizer, SimpleNamespace(batch_size=2, max_grad_norm=None))
    else:
        wrapped = sharding.shard_model(model, torch.device("cpu"), world)
    held = sum(sharding.local_bytes(m) for m in (model.anchor, *model.augments))
    laid_out = peak_mb()
    if layout != LAYOUTS[3]:
        optimizer = torch.optim.AdamW(model.composition_parameters(), lr=1e-4)
    ids = torch.randint(0, 64 if args.tiny else 49152, (2, args.tokens), generator=torch.Generator().manual_seed(rank))
    wrapped.train()
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = wrapped(ids, labels=ids).loss
        if layout == LAYOUTS[3]:
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
    dist.barrier()
    median = sorted(seconds)[len(seconds) // 2]
    row = [layout, rank, round(held / 2**20, 1), f"{held / whole:.3f}", round(laid_out), round(peak_mb()),
           round(median, 2)]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    dist.destroy_process_group()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="processes per layout")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llamas instead of SmolLM2-135M")
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # one launch's layout (internal)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)  # where the bases are (internal)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)  # where rank 0 writes the rows (internal)
    args = parser.parse_args()
    if args.layout is not None:  # one launch, under torchrun
        rows = rank_row(args.layout, args)
        if os.environ.get("RANK", "0") == "0":
            args.rows.write_text(json.dumps(rows))
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        save_bases(Path(folder), args.tiny)
        for layout in LAYOUTS:
            if layout == LAYOUTS[3] and importlib.util.find_spec("deepspeed") is None:
                print("DeepSpeed is not installed (pip install deepspeed): its layout is left out")
                continue
            out = Path(folder) / "rows.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks), __file__,
                       "--layout", layout, "--folder", folder, "--rows", str(out), "--steps", str(args.steps),
                       "--tokens", str(args.tokens), *(["--tiny"] if args.tiny else [])]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            rows.extend(json.loads(out.read_text()))
    print(f"{args.ranks} ranks on {machine()}; {'tiny Llamas' if args.tiny else 'SmolLM2-135M + its first 4 blocks'}, "
          f"batch 2 x {args.tokens} tokens per rank\n")
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
