"""The training loop (on accelerate): AdamW over the composition only, checkpoints, resume, metrics, plot."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from .augment_cache import WithAugmentStates, open_or_build_cache
from .data import Collator, EpochShuffleSampler, data_fingerprint, pad_token_id
from .evaluation import completion_scores, evaluate_loss
from .run_log import append_metrics, plot_losses, read_metrics, truncate_metrics
from .training_config import TrainingConfig
from .training_state import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint_files,
    remove_incomplete,
    restore_rng_state,
    save_checkpoint,
)

__all__ = ["TrainingConfig", "TrainingResult", "train"]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPOSITION_DIR = "composition"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CACHE_DIR = "augment_cache"


@dataclass
class TrainingResult:
    """What a finished run reports.

    Args:
        step: optimiser steps taken in total (resumed runs included).
        train_loss: mean train loss of the last logged window (None when no step ran here).
        eval_metrics: the last evaluation (empty without eval data).
        composition_dir: where the final composition was saved.
        resumed_from: the checkpoint the run continued from, if any.
    """

    step: int
    train_loss: Optional[float]
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    composition_dir: Optional[Path] = None
    resumed_from: Optional[Path] = None


def _accelerator(config: TrainingConfig) -> Any:
    """An Accelerator for this config; accelerate's process-wide state is reset when its precision differs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, config.mixed_precision):
        AcceleratorState._reset_state()  # as transformers' TrainingArguments does between runs
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.cpu,
    )


def _check_model(model: Any) -> None:
    for a in range(len(model.augments)):
        if not model.shares_tokenizer(a):
            raise NotImplementedError(
                "train() reads token-id data sets, so every augment must share the anchor's tokenizer"
            )


def _resume_state(
    model: Any, checkpoint: Path, config: TrainingConfig, data_sha: str, num_examples: int
) -> dict[str, Any]:
    """Load the composition of ``checkpoint`` into ``model`` after checking it belongs to this run."""
    from .composed import ComposedModel

    files = load_checkpoint_files(checkpoint)
    state = files["state"]
    differences = config.trajectory_differences(TrainingConfig.from_dict(state["config"]))
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the training config differs from the checkpoint's "
            f"(checkpoint != now): {'; '.join(differences)}"
        )
    if state["num_examples"] != num_examples or state["data_sha256"] != data_sha:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the training data differ from the data it was trained on "
            f"({state['num_examples']} examples then, {num_examples} now)"
        )
    saved = ComposedModel.from_composition(checkpoint, model.anchor, list(model.augments))
    if saved.resolved_connections != model.resolved_connections:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it connects layers {saved.resolved_connections}, "
            f"the model {model.resolved_connections}"
        )
    model.connections.load_state_dict(saved.connections.state_dict())
    return files


def train(
    model: Any,
    train_dataset: Dataset,
    eval_dataset: Optional[Dataset] = None,
    config: Optional[TrainingConfig] = None,
    output_dir: Union[str, Path, None] = None,
    resume: bool = False,
    tokenizer: Any = None,
) -> TrainingResult:
    """Train the composition of ``model`` (in place) on ``train_dataset``.

    Writes into ``output_dir``: ``metrics.jsonl`` (train and eval records), ``checkpoints/step-N/``
    (every ``save_every`` steps: composition, optimiser, scheduler, RNG states, step and data
    position; the newest ``keep_last`` kept), ``composition/`` (the final composition), ``loss.png``
    and, with ``cache_augment_states``, ``augment_cache/``.

    Args:
        model: a ComposedModel; only ``model.composition_parameters()`` are optimised.
        train_dataset: items ``{"input_ids": [...], "labels": [...]}`` (e.g. a TokenizedDataset).
        eval_dataset: the same kind of items; evaluated every ``eval_every`` steps and at the end.
        config: the TrainingConfig; defaults when None.
        output_dir: the run directory.
        resume: continue from the newest complete checkpoint in ``output_dir`` (ends with the weights
            an uninterrupted run ends with).
        tokenizer: the anchor's tokenizer: pad id, and decoding for exact match on eval data.
    Returns:
        a :class:`TrainingResult`.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    config = config or TrainingConfig()
    if output_dir is None:
        raise TypeError("train() needs output_dir: the directory for checkpoints, metrics and the composition")
    _check_model(model)
    output = Path(output_dir)
    checkpoints = output / CHECKPOINTS_DIR
    metrics_file = output / METRICS_NAME
    start_from = latest_checkpoint(checkpoints) if resume else None
    if resume and start_from is None:
        logger.warning("resume: %s holds no complete checkpoint; starting from step 0", checkpoints)
    if not resume and complete_checkpoints(checkpoints):
        raise FileExistsError(
            f"{checkpoints} holds checkpoints of an earlier run: resume it (resume=True, --resume) "
            "or choose another output directory"
        )
    output.mkdir(parents=True, exist_ok=True)
    remove_incomplete(checkpoints)
    if start_from is None and metrics_file.exists():
        metrics_file.unlink()

    accelerator = _accelerator(config)
    set_seed(config.seed)
    wrapped = accelerator.prepare(model)  # on the accelerator's device (the cache below is computed there)
    pad_id = pad_token_id(tokenizer, model)
    collator = Collator(pad_id, config.padding_side)
    eval_batch_size = config.eval_batch_size or config.batch_size
    data_sha = data_fingerprint(train_dataset)

    train_data, eval_data = train_dataset, eval_dataset
    if config.cache_augment_states:
        started = time.perf_counter()
        with accelerator.main_process_first(), accelerator.autocast():
            cache, built = open_or_build_cache(
                model, train_dataset, output / CACHE_DIR / "train", config.mixed_precision, eval_batch_size, pad_id
            )
            train_data = WithAugmentStates(train_dataset, cache)
            if eval_dataset is not None:
                eval_cache, _ = open_or_build_cache(
                    model, eval_dataset, output / CACHE_DIR / "eval", config.mixed_precision, eval_batch_size, pad_id
                )
                eval_data = WithAugmentStates(eval_dataset, eval_cache)
        cache_seconds = time.perf_counter() - started
        logger.info("augment cache %s in %.2fs", "built" if built else "reused", cache_seconds)

    loader = DataLoader(
        train_data,
        batch_size=config.batch_size,
        sampler=EpochShuffleSampler(len(train_data), config.seed),
        collate_fn=collator,
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
    )
    loader = accelerator.prepare(loader)
    parameters = model.composition_parameters()
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * (config.epochs or 1)
    scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)

    step, epoch, position = 0, 0, 0  # optimiser steps done; current epoch; micro-batches of it consumed
    if start_from is not None:
        files = _resume_state(model, start_from, config, data_sha, len(train_dataset))
        optimizer.load_state_dict(files["optimizer"])
        scheduler.load_state_dict(files["scheduler"])
        restore_rng_state(files["rng"])
        step, epoch, position = (files["state"][k] for k in ("step", "epoch", "position"))
        truncate_metrics(metrics_file, step)
        logger.info("resumed from %s (step %d)", start_from, step)
    elif config.cache_augment_states:
        append_metrics(metrics_file, {"kind": "cache", "step": 0, "built": built, "seconds": cache_seconds})

    def evaluate_now() -> dict[str, Any]:
        wrapped.eval()
        eval_loader = DataLoader(eval_data, batch_size=eval_batch_size, collate_fn=collator)
        loss, tokens = evaluate_loss(wrapped, eval_loader, device=accelerator.device)
        record: dict[str, Any] = {"kind": "eval", "step": step, "eval_loss": loss, "eval_tokens": tokens}
        if (
            config.eval_generate
            and tokenizer is not None
            and hasattr(model, "generate")
            and getattr(eval_dataset, "has_completions", False)
        ):
            with accelerator.autocast():
                scores = completion_scores(
                    model,
                    eval_dataset,
                    tokenizer,
                    eval_batch_size,
                    config.eval_max_new_tokens,
                    config.eval_generate_max_examples,
                )
            record.update(eval_exact_match=scores["exact_match"], eval_chrf=scores["chrf"])
        wrapped.train()
        if accelerator.is_main_process:
            append_metrics(metrics_file, record)
        return record

    progress = tqdm(
        total=total_steps,
        initial=step,
        desc="training",
        disable=not (config.progress_bar and accelerator.is_local_main_process),
    )
    last_eval: dict[str, Any] = {}
    last_loss: Optional[float] = None
    window_losses: list[torch.Tensor] = []
    window_tokens = 0
    window_start = epoch_start = time.perf_counter()
    grad_norm: Optional[torch.Tensor] = None
    wrapped.train()
    while step < total_steps:
        batches = accelerator.skip_first_batches(loader, position) if position else loader
        batches.set_epoch(epoch)
        for batch in batches:
            with accelerator.accumulate(wrapped):
                loss = wrapped(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            position += 1
            window_losses.append(loss.detach())
            window_tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if position == len(loader):  # the epoch is over: the next step starts the next one
                if accelerator.is_main_process:
                    append_metrics(
                        metrics_file,
                        {"kind": "epoch", "step": step, "epoch": epoch, "seconds": time.perf_counter() - epoch_start},
                    )
                epoch, position = epoch + 1, 0
                epoch_start = time.perf_counter()
            if step % config.log_every == 0 or step == total_steps:
                seconds = time.perf_counter() - window_start
                last_loss = torch.stack(window_losses).float().mean().item()
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "tokens_per_s": window_tokens / seconds if seconds > 0 else None,
                }
                if accelerator.is_main_process:
                    append_metrics(metrics_file, record)
                progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                window_losses, window_tokens, window_start = [], 0, time.perf_counter()
            if eval_data is not None and (
                (config.eval_every and step % config.eval_every == 0) or step == total_steps
            ):
                last_eval = evaluate_now()
            if config.save_every and (step % config.save_every == 0 or step == total_steps):
                if accelerator.is_main_process:
                    state = {
                        "step": step,
                        "epoch": epoch,
                        "position": position,
                        "total_steps": total_steps,
                        "num_examples": len(train_dataset),
                        "data_sha256": data_sha,
                        "config": config.to_dict(),
                    }
                    save_checkpoint(checkpoints, step, model, optimizer, scheduler, state, config.keep_last)
                accelerator.wait_for_everyone()
            if step >= total_steps:
                break
    progress.close()

    model = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    composition_dir = output / COMPOSITION_DIR
    if accelerator.is_main_process:
        model.save_composition(composition_dir)
        plot_losses(read_metrics(metrics_file), output / PLOT_NAME)
    return TrainingResult(
        step=step,
        train_loss=last_loss,
        eval_metrics=last_eval,
        composition_dir=composition_dir,
        resumed_from=start_from,
    )

