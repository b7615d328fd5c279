"""Scoring every row of the facts demo, as tasks worker processes share: facts per wording, the anchor's skill, its
ordinary text."""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...core.alignment import align_batch
from ...model.anchor_prefix import forward_with_prefix
from ...model.composed import ComposedModel
from ..jobs import run_jobs
from .config import job_environment
from .evaluation import Reference, arithmetic_items, fact_accuracy, ordinary_cost, ordinary_windows, skill_accuracy
from .rows import BASELINE_ROWS, CALM_ROWS, TRAINED_ROWS, load_anchor, load_augment
from .task import DC_WORDINGS, UNSEEN_WORDINGS, FactsTask

WORDINGS = {**DC_WORDINGS, **UNSEEN_WORDINGS}


def fact_columns(model: Any, tokenizer: Any, task: FactsTask, held_in: int, held_out: int) -> dict[str, float]:
    """Exact match (percent) on held-in and held-out people in every wording."""
    columns = {}
    for group, people in (("held-in", task.held_in[:held_in]), ("held-out", task.held_out[:held_out])):
        for name, wording in WORDINGS.items():
            columns[f"{group} {name}"] = round(fact_accuracy(model, tokenizer, people, wording), 1)
    return columns


def composed_logits(model: ComposedModel) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The logits function of a composed model over anchor ids; an augment with its own tokenizer is aligned."""
    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if all(model.shares_tokenizer(a) for a in range(len(model.augments))):
            return model(**batch, use_cache=False).logits
        aligned = align_batch(batch["input_ids"].tolist(), model.tokenizer, model.augment_tokenizers, "right")
        extra = {k: aligned[k] for k in ("augment_input_ids", "augment_attention_mask", "augment_limits")}
        return model(**batch, **extra, use_cache=False).logits

    return logits


ALONE_ROWS = ("SmolLM2 alone", "augment alone (same tokenizer)", "augment alone (characters)")
ROWS = ALONE_ROWS + CALM_ROWS + BASELINE_ROWS  # the report's rows, in its order


def row_model(prepared: dict[str, Any], row: str, anchor: nn.Module, tokenizer: Any) -> tuple[Any, Any]:
    """Row ``row`` of :data:`ROWS` as a model that generates, and the tokenizer its prompts take: the anchor or an
    augment alone, a composition, LoRA merged into a copy of the anchor, the fine-tuned anchor."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders = prepared["folders"]
    if row == ALONE_ROWS[0]:
        return anchor, tokenizer
    if row not in ROWS:
        raise ValueError(f"Unknown row {row!r}; expected one of {ROWS}")
    kind = "char" if "characters" in row else "same"
    if row in ALONE_ROWS:
        augment, augment_tokenizer = load_augment(kind, folders["augments"][kind])
        return augment, augment_tokenizer or tokenizer
    if row in CALM_ROWS:
        augment, augment_tokenizer = load_augment(kind, folders["augments"][kind])
        if row == "CALM (random augment)":
            torch.manual_seed(prepared["config"].seed + 500)  # the very augment the row was trained with
            augment = augment.__class__(augment.config).eval()
        return ComposedModel.from_composition(folders["rows"][row] / "run" / "composition", anchor, augment,
                                              tokenizer=tokenizer, augment_tokenizer=augment_tokenizer), tokenizer
    if row == BASELINE_ROWS[0]:
        lora = PeftModel.from_pretrained(copy.deepcopy(anchor), folders["rows"][row] / "model")
        return lora.merge_and_unload().eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(folders["rows"][row] / "model").eval(), tokenizer  # fine-tuned


def ordinary_reference(anchor: nn.Module, compositions: list[ComposedModel]) -> Reference:
    """The anchor's logits on a batch and what every row's batch gains from the same forward: the output of its
    block below every composition's lowest connection (``anchor_prefix``), which each composition replays instead
    of running those blocks again (bit for bit what it computes itself; none when a composition connects to the
    embeddings)."""
    layer = min((m.anchor_prefix_layer for m in compositions), default=-1)

    def reference(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        if layer < 0:
            return anchor(**batch, use_cache=False).logits, {}
        output, prefix = forward_with_prefix(anchor, layer, batch["input_ids"], batch["attention_mask"])
        return output.logits, {"anchor_prefix": prefix}

    return reference


def scoring_tasks() -> list[tuple[str, Optional[str]]]:
    """What the scoring computes, one task per process call, the longest first (so two processes end together): the
    loss and KL of every row on ordinary text, then each row's facts and skill columns."""
    return [("ordinary", None), *(("facts", row) for row in (*CALM_ROWS, *BASELINE_ROWS, *ALONE_ROWS))]


@torch.no_grad()
def scoring_job(part: str, row: Optional[str], config: Any, prepared: dict[str, Any], threads: int,
                progress: bool = False) -> dict[str, dict[str, Any]]:
    """One of :func:`scoring_tasks` (a worker process runs each): ``("ordinary", None)`` gives every trained row's
    loss and KL on ordinary text (and the anchor's), ``("facts", row)`` the row's exact match per wording (held-in,
    held-out) and, for all but an augment alone, the skill.

    Args:
        prepared: :func:`~lmcompose.demos.facts.pipeline.prepare`'s result.
        threads: torch threads of this process.
    Returns:
        {row: columns}.
    """
    torch.set_num_threads(threads)
    log = (lambda m: print(f"[scoring {part}] {m}", flush=True)) if progress else None
    prepared = {**prepared, "config": config}
    anchor, tokenizer = load_anchor(prepared["folders"]["anchor"])
    started = time.time()
    if part == "ordinary":
        models = {name: row_model(prepared, name, anchor, tokenizer)[0] for name in TRAINED_ROWS}
        compositions = [m for m in models.values() if isinstance(m, ComposedModel)]
        logits = {name: (composed_logits(m) if isinstance(m, ComposedModel) else
                         (lambda b, m=m: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                           use_cache=False).logits))
                  for name, m in models.items()}
        costs = ordinary_cost(ordinary_reference(anchor, compositions), logits,
                              ordinary_windows(tokenizer, config.ordinary_tokens))
        if log:
            log(f"{config.ordinary_tokens} tokens for {len(costs)} models in {time.time() - started:.0f}s")
        return {("SmolLM2 alone" if name == "anchor" else name): cost for name, cost in costs.items()}
    if part != "facts":
        raise ValueError(f"Unknown scoring part {part!r}; expected 'facts' or 'ordinary'")
    model, model_tokenizer = row_model(prepared, row, anchor, tokenizer)
    task = FactsTask(config.task)
    columns = fact_columns(model, model_tokenizer, task, config.eval_held_in, config.eval_held_out)
    if row not in ALONE_ROWS[1:]:
        columns["skill"] = round(skill_accuracy(model, model_tokenizer, arithmetic_items(config.skill_items)), 1)
    if log:
        log(f"{row}: scored in {time.time() - started:.0f}s")
    return {row: columns}


def score_rows(config: Any, prepared: dict[str, Any], progress: bool = False) -> dict[str, dict[str, Any]]:
    """Every row's columns: facts per wording (held-in, held-out), the skill, the loss and KL on ordinary text, and
    for trained rows their parameter count and training seconds. The :func:`scoring_tasks` run in
    ``config.workers`` processes (one thread each; a process takes the next task as it finishes one), or one after
    the other in one process on every core (this one unless
    :func:`~lmcompose.demos.facts.config.job_environment` holds the kernels)."""
    tasks = scoring_tasks()
    workers = min(len(tasks), config.workers)
    threads = config.threads if workers > 1 else max(1, os.cpu_count() or 1)
    jobs = [(part, row, config, prepared, threads, progress) for part, row in tasks]
    done = run_jobs(scoring_job, jobs, workers, job_environment(config))
    costs, facts = done[0], {name: columns for result in done[1:] for name, columns in result.items()}
    return {name: {**facts[name], **prepared["rows"].get(name, {}), **costs.get(name, {})} for name in ROWS}
