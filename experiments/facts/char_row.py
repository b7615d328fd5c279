"""A CALM row (the character-level one unless --row says) retrained with other settings on a finished demo's
augments, scored as the demo scores it: the facts per wording (held-in, held-out), the loss and KL on the pydoc
text, the few-shot sums (LOG.md runs 29, 30). DEMO is a facts demo output of the same seed; OUT gets the row and
results.json. ``--set NAME=JSON`` changes a setting (config.with_settings), e.g. ``--set
'dc_wordings=["statement","question","flat","where"]'`` for D_C in four wordings (the scoring keeps the demo's four).
Run it with the demo's kernels (``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2`` before the command, as the demo's workers
have them).

    python char_row.py DEMO OUT [--seed 0] [--threads 1] [--row "CALM (same tokenizer)"] [--set preserve_weight=2.0]
        [--set task.held_in_fraction=0.4]
"""
import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo", type=Path, help="the finished demo output (its anchor/ and augments/)")
    p.add_argument("out", type=Path, help="where the row is trained and its figures written")
    p.add_argument("--seed", type=int, default=0, help="the demo's seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                   help="a FactsPipelineConfig field (task.NAME: a FactsTaskConfig one), its value as JSON")
    p.add_argument("--row", default="CALM (characters)", help="the CALM row to train")
    args = p.parse_args()

    import torch

    from lmcompose.demos.facts import evaluation, scoring
    from lmcompose.demos.facts.config import AUGMENT_FIELDS, preset, with_settings
    from lmcompose.demos.facts.rows import load_anchor, train_row_job
    from lmcompose.demos.facts.task import FactsTask

    seed_preset = preset(args.seed, threads=args.threads)
    augments = {kind: str(args.demo / "augments" / seed_preset.fingerprint(*AUGMENT_FIELDS[kind]))
                for kind in ("same", "char")}
    try:
        config = with_settings(seed_preset, args.set)
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    row = args.row
    started = time.time()
    if not (args.out / "done.json").exists():
        train_row_job(row, config, str(args.demo / "anchor"), augments, str(args.out))
    trained = round(time.time() - started)
    torch.set_num_threads(args.threads)
    anchor, tokenizer = load_anchor(args.demo / "anchor")
    prepared = {"config": config, "folders": {"augments": {k: Path(v) for k, v in augments.items()},
                                              "rows": {row: args.out}}}
    model, _ = scoring.row_model(prepared, row, anchor, tokenizer)
    figures = {"settings": args.set, "row": row, "D_C wordings": config.dc_wordings, "train s": trained,
               **scoring.fact_columns(model, tokenizer, FactsTask(config.task), config.eval_held_in,
                                      config.eval_held_out)}
    costs = evaluation.ordinary_cost(scoring.ordinary_reference(anchor, [model]),
                                     {"row": scoring.composed_logits(model)},
                                     evaluation.ordinary_windows(tokenizer, config.ordinary_tokens))
    items = evaluation.arithmetic_items(config.skill_items)
    figures.update(loss=costs["row"]["loss"], anchor_loss=costs["anchor"]["loss"], kl=costs["row"]["kl"],
                   sums=round(evaluation.skill_accuracy(model, tokenizer, items), 1))
    print(json.dumps(figures), flush=True)
    (args.out / "results.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
