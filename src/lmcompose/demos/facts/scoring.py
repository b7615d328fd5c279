"""Scoring every row of the facts demo in one process: facts per wording, the anchor's skill, its ordinary text."""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable

import torch
from torch import nn

from ...core.alignment import align_batch
from ...model.composed import ComposedModel
from ..jobs import run_jobs
from .config import job_environment
from .evaluation import arithmetic_items, fact_accuracy, ordinary_cost, ordinary_windows, skill_accuracy
from .rows import BASELINE_ROWS, CALM_ROWS, load_anchor, load_augment
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


def trained_models(prepared: dict[str, Any], anchor: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Every trained row as a model that generates: the three compositions, LoRA merged into a copy of the anchor,
    the fine-tuned anchor."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders, models = prepared["folders"], {}
    for row in CALM_ROWS:
        kind = "char" if row == "CALM (characters)" else "same"
        augment, augment_tokenizer = load_augment(kind, folders["augments"][kind])
        if row == "CALM (random augment)":
            torch.manual_seed(prepared["config"].seed + 500)  # the very augment the row was trained with
            augment = augment.__class__(augment.config).eval()
        models[row] = ComposedModel.from_composition(folders["rows"][row] / "run" / "composition",
                                                     anchor, augment, tokenizer=tokenizer,
                                                     augment_tokenizer=augment_tokenizer)
    lora = PeftModel.from_pretrained(copy.deepcopy(anchor), folders["rows"][BASELINE_ROWS[0]] / "model")
    models[BASELINE_ROWS[0]] = lora.merge_and_unload().eval()
    finetuned = folders["rows"][BASELINE_ROWS[1]] / "model"
    models[BASELINE_ROWS[1]] = AutoModelForCausalLM.from_pretrained(finetuned).eval()
    return models


SCORING_JOBS = ("facts", "ordinary")  # the facts and skill columns of every row; the loss and KL of every row


@torch.no_grad()
def scoring_job(part: str, config: Any, prepared: dict[str, Any], threads: int, progress: bool = False
                ) -> dict[str, dict[str, Any]]:
    """One part of :data:`SCORING_JOBS` for every row (a worker process runs each): ``"facts"`` gives the exact
    match per wording (held-in, held-out) and the skill, ``"ordinary"`` the loss and KL on ordinary text.

    Args:
        prepared: :func:`~lmcompose.demos.facts.pipeline.prepare`'s result.
        threads: torch threads of this process.
    """
    torch.set_num_threads(threads)
    log = (lambda m: print(f"[scoring {part}] {m}", flush=True)) if progress else None
    prepared = {**prepared, "config": config}
    anchor, tokenizer = load_anchor(prepared["folders"]["anchor"])
    models = trained_models(prepared, anchor, tokenizer)
    if part == "ordinary":
        started = time.time()
        logits = {name: (composed_logits(m) if isinstance(m, ComposedModel) else (lambda b, m=m: m(**b, use_cache=False).logits))
                  for name, m in models.items()}
        costs = ordinary_cost(lambda b: anchor(**b, use_cache=False).logits, logits,
                              ordinary_windows(tokenizer, config.ordinary_tokens))
        if log:
            log(f"{config.ordinary_tokens} tokens for {len(costs)} models in {time.time() - started:.0f}s")
        return {("SmolLM2 alone" if name == "anchor" else name): cost for name, cost in costs.items()}
    if part != "facts":
        raise ValueError(f"Unknown scoring part {part!r}; expected one of {SCORING_JOBS}")
    task, items = FactsTask(config.task), arithmetic_items(config.skill_items)
    rows: dict[str, dict[str, Any]] = {}

    def score(name: str, model: Any, model_tokenizer: Any, skill: bool = True) -> None:
        started = time.time()
        rows[name] = fact_columns(model, model_tokenizer, task, config.eval_held_in, config.eval_held_out)
        if skill:
            rows[name]["skill"] = round(skill_accuracy(model, model_tokenizer, items), 1)
        if log:
            log(f"{name}: scored in {time.time() - started:.0f}s")

    score("SmolLM2 alone", anchor, tokenizer)
    for kind, name in (("same", "augment alone (same tokenizer)"), ("char", "augment alone (characters)")):
        augment, augment_tokenizer = load_augment(kind, prepared["folders"]["augments"][kind])
        score(name, augment, augment_tokenizer or tokenizer, skill=False)
    for name, model in models.items():
        score(name, model, tokenizer)
    return rows


def score_rows(config: Any, prepared: dict[str, Any], progress: bool = False) -> dict[str, dict[str, Any]]:
    """Every row's columns: facts per wording (held-in, held-out), the skill, the loss and KL on ordinary text, and
    for trained rows their parameter count and training seconds. The two :data:`SCORING_JOBS` run side by side in
    ``config.workers`` processes (one thread each), or one after the other in one process on every core (this one
    unless :func:`~lmcompose.demos.facts.config.job_environment` holds the kernels)."""
    workers = min(len(SCORING_JOBS), config.workers)
    threads = config.threads if workers > 1 else max(1, os.cpu_count() or 1)
    jobs = [(part, config, prepared, threads, progress) for part in SCORING_JOBS]
    facts, costs = run_jobs(scoring_job, jobs, workers, job_environment(config))
    return {name: {**columns, **prepared["rows"].get(name, {}), **costs.get(name, {})} for name, columns in facts.items()}
