"""The speed and memory figures on a CUDA machine: bf16, random-init Llamas of about 1.1B (anchor) and 150M (augment).

    python benchmarks/bench_gpu.py [--batch 8] [--seq 1024] [--repeats 5] [--peak-tflops 989]
    python benchmarks/bench_gpu.py --small     # the same script on tiny models (a check that it runs, CPU or GPU)

Prints two Markdown tables (medians of interleaved runs, as the CPU scripts):

* training step (forward + backward + AdamW) of composed, floor, LoRA (matched parameters) and calm-pytorch:
  step ms, tokens/s, model FLOPs utilisation (MFU), time / floor, peak CUDA memory / floor;
* generation (tokens/s) at 256 and 1024 total tokens: composed, anchor alone, augment alone, ideal
  1 / (1/anchor + 1/augment), full recompute and calm-pytorch.

MFU counts the matmul FLOPs a step needs (attention scores left out): the augment's forward up to its highest
connection (2 N T), the anchor's forward (2 N T), the backward through the anchor blocks above the lowest
connection and the LM head (2 N T: gradients of activations only, the weights are frozen), and the trained
connections (6 N T). The peak is the GPU's dense bf16 figure (``--peak-tflops``, else looked up by name).
Nothing else in the project needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from bench_generate import HEADERS as GENERATION_HEADERS
from bench_generate import calm_pytorch, generation_row
from bench_train import build_step

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.core import introspect
from lmcompose.core.config import resolve_connections

from common import interleaved_medians, machine, table

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}

# TinyLlama-1.1B's shape for the anchor, a 12-layer 768-wide Llama (~150M with its embeddings) for the augment.
ANCHOR = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
AUGMENT = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
               num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096)
SMALL_ANCHOR = dict(ANCHOR, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512)
SMALL_AUGMENT = dict(AUGMENT, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512)


def llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    with device:  # build on the device directly: no 1B-parameter copy in host memory first
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS.items():  # the longer, more specific names come first where it matters
        if key in name:
            return value * 1e12
    return None


def step_flops(anchor: torch.nn.Module, augment: torch.nn.Module, case: str, trainable: int, tokens: int) -> float:
    """Matmul FLOPs of one training step of ``case`` (see the module docstring)."""
    blocks_a, blocks_b = introspect.decoder_blocks(augment), introspect.decoder_blocks(anchor)
    pairs = resolve_connections(CompositionConfig(), [len(blocks_a)], len(blocks_b))[0]  # the cases' connections
    highest, lowest = max(i for i, _ in pairs), min(j for _, j in pairs)

    def params(modules) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    head = anchor.get_output_embeddings().weight.numel()
    augment_forward = params(blocks_a[: highest + 1])
    anchor_forward = params(blocks_b) + head
    if case == "lora":  # LoRA needs the activation gradients through every block
        anchor_backward = anchor_forward
        augment_forward = 0
    else:
        anchor_backward = params(blocks_b[lowest:]) + head
    return tokens * (2 * augment_forward + 2 * anchor_forward + 2 * anchor_backward + 6 * trainable)


def train_table(args: argparse.Namespace, anchor, augment, device) -> str:
    ids = torch.randint(3, anchor.config.vocab_size, (args.batch, args.seq), device=device)
    cases, counts = {}, {}
    for case in ("composed", "composed-recompute", "floor", "lora", "calm-pytorch"):
        try:
            cases[case], counts[case] = build_step(case, anchor, augment, ids)
        except ImportError as err:
            print(f"{case}: skipped ({err})")
    seconds = interleaved_medians(cases, repeats=args.repeats)
    memory = {}
    for case, step in cases.items():
        if device.type != "cuda":
            memory[case] = None
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        memory[case] = (torch.cuda.max_memory_allocated() - before) / 2**20
    peak = peak_flops(args)
    tokens = args.batch * args.seq
    floor_s, floor_m = seconds["floor"], memory.get("floor")
    rows = []
    for case in cases:
        flops = step_flops(anchor, augment, case, counts[case], tokens) if case != "floor" else None
        rows.append([
            case,
            f"{counts[case]:,}",
            f"{seconds[case] * 1000:.1f}",
            f"{tokens / seconds[case]:.0f}",
            f"{100 * flops / seconds[case] / peak:.1f}%" if flops and peak else "-",
            f"{seconds[case] / floor_s:.2f}",
            f"{memory[case]:.0f}" if memory[case] is not None else "-",
            f"{memory[case] / floor_m:.2f}" if memory[case] and floor_m else "-",
        ])
    return table(["case", "trainable params", "step ms", "tokens/s", "MFU", "time / floor", "peak MiB", "memory / floor"],
                 rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per training step")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per training sequence")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per case (median)")
    parser.add_argument("--new", type=int, default=128, help="new tokens per generated sequence")
    parser.add_argument("--configs", nargs="+", default=["256x1", "256x8", "1024x1"], help="generation TOTALxBATCH")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's dense bf16 peak (default: by GPU name)")
    parser.add_argument("--small", action="store_true", help="tiny models: check that the script runs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or not args.small else torch.float32
    if args.small:
        args.seq, args.new, args.repeats = min(args.seq, 64), min(args.new, 8), min(args.repeats, 2)
        args.configs = ["32x1", "32x2"]
    anchor = llama(SMALL_ANCHOR if args.small else ANCHOR, device, dtype, seed=1)
    augment = llama(SMALL_AUGMENT if args.small else AUGMENT, device, dtype, seed=2)
    print(f"machine: {machine()}")
    print(f"anchor {sum(p.numel() for p in anchor.parameters()) / 1e6:.0f}M, augment "
          f"{sum(p.numel() for p in augment.parameters()) / 1e6:.0f}M params, {dtype}; training batch "
          f"{args.batch} x {args.seq}; generation {args.new} new tokens\n")
    print(train_table(args, anchor, augment, device))
    print()
    model = ComposedModel(anchor, augment, CompositionConfig())
    with torch.no_grad():  # trained-looking composition: nonzero output projections
        for p in model.composition_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else None
    calm = calm_pytorch(model)
    rows = []
    for spec in args.configs:
        total, batch = (int(x) for x in spec.lower().split("x"))
        rows.append(generation_row(model, total, batch, args.new, args.repeats, True, calm))
    print(table(GENERATION_HEADERS, rows))


if __name__ == "__main__":
    main()
