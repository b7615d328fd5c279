"""Exploration (run 43): train the pipeline's CALM row on cached bases and split held-out KV-MATH by operand count.

Usage: python split.py ../../outputs/kv_quick3/bases/<fingerprint>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmcompose import ComposedModel
from lmcompose.tasks.kv import KVRepository
from lmcompose.tasks.kv_pipeline import composition_config, composition_data, evaluation_sets, load_bases, quick_config
from lmcompose.tasks.kv_training import batches, exact_match, train_loop


def main() -> None:
    torch.set_num_threads(1)
    config = quick_config()
    anchor, augment, tok = load_bases(Path(sys.argv[1]))
    repo = KVRepository(config.task)
    torch.manual_seed(config.seed)
    model = ComposedModel(anchor, augment, composition_config(config)).train()
    data = batches(composition_data(repo, config.num_math_mix), tok, config.batch_size, config.seed + 13)
    train_loop(model.composition_parameters(), lambda b: model(**b).loss, data, config.compose_steps, config.compose_lr)
    model.eval()
    gen = lambda ids, mask, n: model.generate(ids, mask, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                                              pad_token_id=tok.pad_token_id)
    exprs, kv = repo.evaluation_expressions(), evaluation_sets(repo)["KV-MATH"]
    print("RESULT all", exact_match(gen, kv, tok), {n: round(exact_match(gen, [e for x, e in zip(exprs, kv) if len(x.keys) == n], tok), 1)
                                                     for n in (2, 3)})


if __name__ == "__main__":
    main()
