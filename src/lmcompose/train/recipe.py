"""The training loop (on accelerate): AdamW over the composition only, checkpoints, resume, metrics, plot."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..io.augment_cache import WithAugmentStates, open_or_build_cache
from ..core.padding import pad_token_id
from ..io.collate import collator_for
from ..io.datasets import data_fingerprint
from .sampler import EpochShuffleSampler
from .evaluation import completion_scores, evaluate_loss
from ..io.input_checks import check_example_lengths
from .faults import StopSignals, TrainingDivergedError, agree_across_ranks, stop_diverged
from .run_log import append_metrics, plot_losses, read_metrics, truncate_metrics
from .config import TrainingConfig
from ..io.atomic import publish_directory, remove_stale_temporaries, remove_unpublished
from .checkpoints import (
    DamagedCheckpointError,
    complete_checkpoints,
    remove_incomplete,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = ["TrainingConfig", "TrainingDivergedError", "TrainingResult", "train"]

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
        composition_dir: where the final composition was saved (None when the run was interrupted).
        resumed_from: the checkpoint the run continued from, if any.
        interrupted: the signal ("SIGTERM", "SIGINT") that stopped the run early, else None.
        checkpoint: the checkpoint written when the run was interrupted (resume from it).
    """

    step: int
    train_loss: Optional[float]
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    composition_dir: Optional[Path] = None
    resumed_from: Optional[Path] = None
    interrupted: Optional[str] = None
    checkpoint: Optional[Path] = None


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
        # by default accelerate steps the scheduler once per process at each optimiser step, so n processes
        # would run the schedule n times faster; the loop steps it once per optimiser step instead
        step_scheduler_with_optimizer=False,
    )


def _ignore_frozen_in_ddp(model: Any) -> list[str]:
    """The names of every parameter and buffer outside the connections: DDP neither broadcasts nor buckets them.

    The bases are frozen and loaded identically on every rank, so only the connections need DDP; without this
    DDP would broadcast the whole anchor at start and its buffers before every forward.
    """
    names = [n for n, _ in model.named_parameters() if not n.startswith("connections.")]
    return names + [n for n, _ in model.named_buffers() if not n.startswith("connections.")]


def _prepare_model(accelerator: Any, model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    kind = str(accelerator.distributed_type.name)
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise NotImplementedError(
            f"train() runs on one process or data-parallel (DDP) processes, not under {kind}: sharding puts part of the "
            "composition and of its optimiser state on each rank, and checkpoints are written from rank 0's view. "
            "Launch with DDP (accelerate launch --multi_gpu or --num_processes N); see docs/distributed.md"
        )
    ddp = accelerator.num_processes > 1 and kind.startswith("MULTI_")
    if not ddp:  # one process, FSDP or DeepSpeed: accelerate wraps (or not) as configured
        return accelerator.prepare(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, _ignore_frozen_in_ddp(model))
    try:
        return accelerator.prepare(model)
    finally:
        del model._ddp_params_and_buffers_to_ignore  # DDP read it at construction; the model keeps no trace


def _check_model(model: Any, config: TrainingConfig) -> None:
    own = [a for a in range(len(model.augments)) if not model.shares_tokenizer(a)]
    if own and config.cache_augment_states:
        raise ValueError(
            f"cache_augment_states (--cache-augment-states) needs augments that share the anchor's tokenizer; "
            f"augment {own[0]} has its own, so its states depend on how each batch aligns. Turn the cache off"
        )


def _resume_state(
    model: Any, checkpoint: Path, config: TrainingConfig, data_sha: str, num_examples: int, num_processes: int = 1
) -> dict[str, Any]:
    """Load the composition of ``checkpoint`` into ``model`` after checking it belongs to this run."""
    from ..model.composed import ComposedModel

    files = verify_checkpoint(checkpoint)
    state = files["state"]
    if state.get("num_processes", 1) != num_processes:  # the data position counts each process's micro-batches
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was written by a run on {state.get('num_processes', 1)} "
            f"process(es), this one has {num_processes}; launch it with as many processes as before"
        )
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


def _newest_readable(checkpoints: Path) -> Optional[Path]:
    """The newest checkpoint whose files all read; damaged newer ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(checkpoints)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as err:
            logger.warning("skipping checkpoint %s: %s", path, err)
            continue
        return path
    return None


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
    _check_model(model, config)
    check_example_lengths(train_dataset, model, "the training data")  # before any work, not at the step that fails
    if eval_dataset is not None:
        check_example_lengths(eval_dataset, model, "the evaluation data")
    output = Path(output_dir)
    checkpoints = output / CHECKPOINTS_DIR
    metrics_file = output / METRICS_NAME
    if not resume and complete_checkpoints(checkpoints):
        raise FileExistsError(
            f"{checkpoints} holds checkpoints of an earlier run: resume it (resume=True, --resume) "
            "or choose another output directory"
        )
    start_from = _newest_readable(checkpoints) if resume else None
    if resume and start_from is None:
        if complete_checkpoints(checkpoints):
            raise DamagedCheckpointError(
                f"resume: no checkpoint in {checkpoints} can be read (see the warnings above); "
                "delete the damaged ones to start again"
            )
        logger.warning("resume: %s holds no complete checkpoint; starting from step 0", checkpoints)

    accelerator = _accelerator(config)
    main = accelerator.is_main_process  # only rank 0 writes files: checkpoints, metrics, plot, composition
    if main:
        output.mkdir(parents=True, exist_ok=True)
        remove_incomplete(checkpoints)
        remove_unpublished(output, COMPOSITION_DIR)
        remove_stale_temporaries(output)
        if start_from is None and metrics_file.exists():
            metrics_file.unlink()
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    wrapped = _prepare_model(accelerator, model)  # on the accelerator's device (the cache below is computed there)
    pad_id = pad_token_id(tokenizer, model)
    collator = collator_for(model, tokenizer, config.padding_side)  # aligns augments with their own tokenizer
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

    # Every rank builds the same loader; accelerate deals its batches out in turn (rank r gets batches r, r + n, ...
    # of the one (seed, epoch) order), so n processes see, per step, the batches one process sees with n times
    # the gradient accumulation.
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
        files = _resume_state(model, start_from, config, data_sha, len(train_dataset), accelerator.num_processes)
        optimizer.load_state_dict(files["optimizer"])
        scheduler.load_state_dict(files["scheduler"])
        restore_rng_state(files["rng"])
        step, epoch, position = (files["state"][k] for k in ("step", "epoch", "position"))
        if main:
            truncate_metrics(metrics_file, step)
        logger.info("resumed from %s (step %d)", start_from, step)
    elif config.cache_augment_states and main:
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
        if main:
            append_metrics(metrics_file, record)
        return record

    def save(step: int) -> Path:
        if main:
            state = {
                "step": step,
                "epoch": epoch,
                "position": position,
                "total_steps": total_steps,
                "num_examples": len(train_dataset),
                "num_processes": accelerator.num_processes,
                "data_sha256": data_sha,
                "config": config.to_dict(),
            }
            save_checkpoint(checkpoints, step, model, optimizer, scheduler, state, config.keep_last)
        accelerator.wait_for_everyone()
        return checkpoints / f"step-{step}"

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
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # this step saw a NaN/inf so far
    stop: Optional[int] = None  # the signal every rank agreed to stop on
    saved_at: Optional[Path] = None
    wrapped.train()
    with StopSignals() as signals, progress:
        while step < total_steps and stop is None:
            batches = accelerator.skip_first_batches(loader, position) if position else loader
            batches.set_epoch(epoch)
            for batch in batches:
                with accelerator.accumulate(wrapped):
                    loss = wrapped(**batch).loss
                    accelerator.backward(loss)
                    nonfinite |= ~torch.isfinite(loss.detach())
                    if accelerator.sync_gradients:
                        if config.max_grad_norm is not None:
                            grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                            if isinstance(grad_norm, torch.Tensor):
                                nonfinite |= ~torch.isfinite(grad_norm.detach()).to(nonfinite.device)
                        diverged, stop = agree_across_ranks(accelerator, nonfinite, signals.received)
                        if diverged:
                            stop_diverged(step + 1, epoch, checkpoints, metrics_file if main else None)
                        nonfinite = torch.zeros_like(nonfinite)
                    optimizer.step()  # a no-op while gradients accumulate
                    if accelerator.sync_gradients:
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
                    if main:
                        append_metrics(
                            metrics_file,
                            {"kind": "epoch", "step": step, "epoch": epoch, "seconds": time.perf_counter() - epoch_start},
                        )
                    epoch, position = epoch + 1, 0
                    epoch_start = time.perf_counter()
                if step % config.log_every == 0 or step == total_steps:
                    seconds = time.perf_counter() - window_start
                    last_loss, tokens = _window_stats(accelerator, window_losses, window_tokens)
                    record = {
                        "kind": "train",
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "loss": last_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "tokens_per_s": tokens / seconds if seconds > 0 else None,
                    }
                    if main:
                        append_metrics(metrics_file, record)
                    progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                    window_losses, window_tokens, window_start = [], 0, time.perf_counter()
                if eval_data is not None and (
                    (config.eval_every and step % config.eval_every == 0) or step == total_steps
                ):
                    last_eval = evaluate_now()
                saved_at = None
                if config.save_every and (step % config.save_every == 0 or step == total_steps):
                    saved_at = save(step)
                if step >= total_steps:
                    stop = None  # the run is complete: a late signal changes nothing
                    break
                if stop is not None:
                    saved_at = saved_at or save(step)
                    break

    if stop is not None:
        name = signal.Signals(stop).name
        if main:
            append_metrics(metrics_file, {"kind": "interrupted", "step": step, "signal": name})
        logger.warning("%s: stopped at step %d of %d; resume from %s", name, step, total_steps, saved_at)
        return TrainingResult(
            step=step, train_loss=last_loss, eval_metrics=last_eval, resumed_from=start_from,
            interrupted=name, checkpoint=saved_at,
        )

    model = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    composition_dir = output / COMPOSITION_DIR
    if main:
        tmp = output / f".{COMPOSITION_DIR}.tmp-{os.getpid()}"
        model.save_composition(tmp)
        publish_directory(tmp, composition_dir)  # never weights of this run beside the JSON of an earlier one
        plot_losses(read_metrics(metrics_file), output / PLOT_NAME)
    accelerator.wait_for_everyone()
    return TrainingResult(
        step=step,
        train_loss=last_loss,
        eval_metrics=last_eval,
        composition_dir=composition_dir,
        resumed_from=start_from,
    )


def _window_stats(accelerator: Any, losses: list[torch.Tensor], tokens: int) -> tuple[float, float]:
    """Mean loss of the logging window and its token count, over every rank."""
    stats = torch.stack([torch.stack(losses).float().mean(), torch.tensor(float(tokens), device=losses[0].device)])
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_reduce(stats)
        stats[0] /= accelerator.num_processes
    loss, count = stats.tolist()
    return loss, count
