"""A CALM row (the character-level one unless --row says) retrained with other settings on a finished demo's
augments, scored as the demo scores it: the facts per wording (held-in, held-out), the loss and KL on the pydoc
text, the few-shot sums (LOG.md runs 29, 30). DEMO is a facts demo output of the same seed; OUT gets the row and
results.json. ``--wording NAME=TEMPLATE`` adds a wording to D_C (and to the preservation texts' questions about
people not in the task); the scoring keeps the demo's four. Run it with the demo's kernels (``ATEN_CPU_CAPABILITY=avx2
MKL_CBWR=AVX2`` before the command, as the demo's workers have them).

    python char_row.py DEMO OUT [--seed 0] [--threads 1] [--row "CALM (same tokenizer)"] [--set preserve_weight=2.0]
        [--set task.held_in_fraction=0.4] [--wording "flat={name} has a flat in"]
"""
import argparse
import dataclasses
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
    p.add_argument("--wording", action="append", default=[], metavar="NAME=TEMPLATE",
                   help="one more D_C wording, {name} where the person's name goes (the answer is ' CITY')")
    args = p.parse_args()

    import torch

    from lmcompose.demos.facts import evaluation, scoring
    from lmcompose.demos.facts.config import AUGMENT_FIELDS, FactsPipelineConfig
    from lmcompose.demos.facts.rows import load_anchor, train_row_job
    from lmcompose.demos.facts.task import DC_WORDINGS, UNSEEN_WORDINGS, FactsTask, FactsTaskConfig

    for setting in args.wording:  # D_C's dict itself, which the rows read; the scoring took its wordings at import
        name, template = setting.split("=", 1)
        template = template.replace("\\n", "\n")
        if "{name}" not in template or any(w in template.lower() for w in ("city", "home", "resid", "'s")):
            raise SystemExit(f"--wording {setting!r}: needs {{name}} and none of the unseen wordings' words")
        DC_WORDINGS[name] = template
    assert not set(DC_WORDINGS.values()) & set(UNSEEN_WORDINGS.values())

    preset = FactsPipelineConfig(task=FactsTaskConfig(seed=args.seed), seed=args.seed, threads=args.threads)
    augments = {kind: str(args.demo / "augments" / preset.fingerprint(*AUGMENT_FIELDS[kind]))
                for kind in ("same", "char")}
    fields, task_fields = {}, {}
    for setting in args.set:
        name, value = setting.split("=", 1)
        (task_fields if name.startswith("task.") else fields)[name.removeprefix("task.")] = json.loads(value)
    config = dataclasses.replace(preset, task=dataclasses.replace(preset.task, **task_fields), **fields)
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
    figures = {"settings": args.set, "row": row, "D_C wordings": DC_WORDINGS, "train s": trained,
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
