"""The training recipe of a composition as named steps: setup, one step, evaluate, save, the loop, finish.

AdamW over the connections only (on accelerate), warmup then decay, gradient accumulation and clipping,
periodic evaluation and checkpoints, exact resume, ``metrics.jsonl`` and a loss plot. :func:`train` runs one
:class:`Recipe`; everything that changes while it runs is in its :class:`RunState`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..core.padding import pad_token_id
from ..io.atomic import publish_directory, remove_directory, remove_stale_temporaries, remove_unpublished
from ..io.augment_cache import with_cached_states
from ..io.collate import collator_for
from ..io.composition_files import composition_metadata, save_composition
from ..io.datasets import WithPreservation, data_fingerprint
from ..io.input_checks import check_example_lengths
from ..io.locks import output_lock
from ..model.anchor_prefix import check_prefix_anchor
from . import engine, layouts, objective, sharding
from .anchor_states import AnchorStateCache
from .checkpoints import (
    find_start,
    remove_incomplete,
    restore_composition,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainingConfig
from .evaluation import completion_scores, evaluate_loss
from .faults import StopSignals, TrainingDivergedError, stop_diverged
from .preservation import check_preservation
from .run_log import append_metrics, plot_losses, read_metrics, truncate_metrics
from .run_state import RunState, TrainingResult
from .sampler import EpochShuffleSampler

__all__ = ["Recipe", "RunState", "TrainingConfig", "TrainingDivergedError", "TrainingResult", "train"]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPOSITION_DIR = "composition"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CACHE_DIR = "augment_cache"


class Recipe:
    """One training run of ``model``'s composition; see :func:`train` for the arguments and what it writes."""

    def __init__(self, model: Any, train_dataset: Dataset, eval_dataset: Optional[Dataset] = None,
                 config: Optional[TrainingConfig] = None, output_dir: Union[str, Path, None] = None,
                 resume: bool = False, tokenizer: Any = None, preserve_dataset: Optional[Dataset] = None,
                 on_locked: Optional[Callable[[], None]] = None) -> None:
        if output_dir is None:
            raise TypeError("train() needs output_dir: the directory for checkpoints, metrics and the composition")
        self.model = model
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.config = config or TrainingConfig()
        self.output = Path(output_dir)
        self.checkpoints = self.output / CHECKPOINTS_DIR
        self.metrics_file = self.output / METRICS_NAME
        self.resume = resume
        self.tokenizer = tokenizer
        self.preserve_dataset = preserve_dataset if self.config.preserve_weight > 0 else None
        self.on_locked = on_locked
        self.state = RunState()
        self.metadata: Optional[dict[str, Any]] = None  # the composition's JSON, read before the model is sharded

    # ----------------------------------------------------------------- setup

    def setup(self) -> None:
        """Check the inputs, find the checkpoint to start from, prepare the output, data, optimiser; restore."""
        from accelerate.utils import set_seed

        self.start_from = find_start(self.checkpoints, self.resume)
        self.accelerator = engine.make_accelerator(self.config)
        self.main = self.accelerator.is_main_process  # only rank 0 writes files
        self._prepare_output()
        set_seed(self.config.seed)
        self.layout = layouts.layout_for(self.config)
        # on the accelerator's device (DDP over the connections on several processes); FSDP2 shards it below,
        # DeepSpeed's ZeRO-3 with the optimiser
        self.wrapped = self.layout.wrap(self.accelerator, self.model)
        self._setup_data()
        self._setup_schedule()
        self.metadata = self.layout.metadata(self.model, composition_metadata)  # sharded: where the bases are whole
        files = self._restore_composition() if self.start_from is not None else None
        self.wrapped = self.layout.shard(self.accelerator, self.model, self.wrapped)  # into restored connections
        self._setup_optimizer()
        self.state.nonfinite = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)
        if files is not None:
            self._restore_training(files)
        elif self.config.cache_augment_states and self.main:
            append_metrics(self.metrics_file, {"kind": "cache", "step": 0, **self.cache_report})

    def check_inputs(self) -> None:
        """Refuse what cannot train before any work: a cache that cannot apply, examples longer than the models."""
        own = [a for a in range(len(self.model.augments)) if not self.model.shares_tokenizer(a)]
        if own and self.config.cache_augment_states:
            raise ValueError(
                f"cache_augment_states (--cache-augment-states) needs augments that share the anchor's tokenizer; "
                f"augment {own[0]} has its own, so its states depend on how each batch aligns. Turn the cache off"
            )
        check_preservation(self.config, self.preserve_dataset)
        if self.config.cache_anchor_states:
            check_prefix_anchor(self.model.anchor, self.model.anchor_prefix_layer)
        sharding.check_sharding(self.config, sharding.launched_processes())
        check_example_lengths(self.train_dataset, self.model, "the training data")
        for data, what in ((self.eval_dataset, "the evaluation data"), (self.preserve_dataset, "the preservation data")):
            if data is not None:
                check_example_lengths(data, self.model, what)

    def _prepare_output(self) -> None:
        """Create the run directory and clear what a killed run left (partial checkpoints, temporaries)."""
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            remove_incomplete(self.checkpoints)
            remove_unpublished(self.output, COMPOSITION_DIR)
            remove_stale_temporaries(self.output)
            if self.start_from is None:  # a fresh run: nothing of an earlier one stays beside its records
                self.metrics_file.unlink(missing_ok=True)
                if (self.output / COMPOSITION_DIR).is_dir():
                    remove_directory(self.output / COMPOSITION_DIR)
        self.accelerator.wait_for_everyone()

    def _setup_data(self) -> None:
        """The collator, the augment-state cache when asked for, and the training loader."""
        config = self.config
        self.collator = collator_for(self.model, self.tokenizer, config.padding_side)
        self.eval_batch_size = config.eval_batch_size or config.batch_size
        self.train_data, self.eval_data = self.train_dataset, self.eval_dataset
        if self.preserve_dataset is not None:
            self.train_data = WithPreservation(self.train_dataset, self.preserve_dataset, config.preserve_ratio)
        self.data_sha = data_fingerprint(self.train_data)
        if config.cache_augment_states:
            self._open_augment_cache()
        self.anchor_cache = None
        if config.cache_anchor_states:
            self._fill_anchor_cache()
        # Every rank builds the same loader; accelerate deals its batches out in turn (rank r gets batches r, r + n,
        # ... of the one (seed, epoch) order), so n processes see, per step, the batches one process sees with n
        # times the gradient accumulation.
        loader = DataLoader(
            self.train_data,
            batch_size=config.batch_size,
            sampler=EpochShuffleSampler(len(self.train_data), config.seed),
            collate_fn=self.collator,
            generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
        )
        self.loader = self.accelerator.prepare(loader)

    def _fill_anchor_cache(self) -> None:
        """The anchor's states below the lowest connection for every training text and preservation text."""
        started = time.perf_counter()
        self.anchor_cache = AnchorStateCache(self.model)
        items = (self.train_data[i] for i in range(len(self.train_data)))
        texts = (text for item in items for text in (item["input_ids"], *item.get("preserve", ())))
        with self.accelerator.autocast():  # the precision the forward would compute them in
            self.anchor_cache.fill(self.model.anchor, texts)
        logger.info("anchor states of %d texts (%d tokens) in %.2fs", len(self.anchor_cache.states),
                    self.anchor_cache.tokens, time.perf_counter() - started)

    def _open_augment_cache(self) -> None:
        """Wrap the datasets so each item carries its augments' states, computed once (or reused from disk)."""
        started = time.perf_counter()
        with self.accelerator.main_process_first(), self.accelerator.autocast():  # rank 0 builds, the others read
            self.train_data, self.eval_data, built = with_cached_states(
                self.model, self.train_dataset, self.eval_dataset, self.output / CACHE_DIR, self.config.mixed_precision,
                self.eval_batch_size, pad_token_id(self.tokenizer, self.model))
        seconds = time.perf_counter() - started
        self.cache_report = {"built": built, "seconds": seconds}
        logger.info("augment cache %s in %.2fs", "built" if built else "reused", seconds)

    def _setup_schedule(self) -> None:
        """The run's length in optimiser steps, from the loader and the config."""
        self.steps_per_epoch = math.ceil(len(self.loader) / self.config.gradient_accumulation_steps)
        self.total_steps = self.config.max_steps or self.steps_per_epoch * (self.config.epochs or 1)

    def _setup_optimizer(self) -> None:
        """AdamW over the composition parameters (shards of them under FSDP2) and the learning-rate schedule; under
        ZeRO-3 the model and that AdamW partitioned by DeepSpeed (the schedule stays the recipe's)."""
        self.parameters = self.model.composition_parameters()
        optimizer, scheduler = engine.make_optimizer(self.parameters, self.config, self.total_steps)
        self.wrapped, self.optimizer, self.scheduler = self.layout.prepare(
            self.accelerator, self.model, self.wrapped, optimizer, scheduler, self.config)

    def _restore_composition(self) -> dict[str, Any]:
        """Load ``start_from``'s composition into the model (checked against this run); its other files."""
        fingerprints = (self.metadata["anchor"], self.metadata["augments"]) if self.metadata is not None else None
        return restore_composition(self.model, self.start_from, self.config, self.data_sha, len(self.train_dataset),
                                   self.accelerator.num_processes, self.total_steps, len(self.loader), fingerprints)

    def _restore_training(self, files: dict[str, Any]) -> None:
        """Continue from ``start_from``: optimiser, scheduler, RNG states and the data position."""
        self.layout.load_optimizer_state(self.optimizer, self.parameters, files["optimizer"])  # full tensors
        self.scheduler.load_state_dict(files["scheduler"])
        restore_rng_state(files["rng"])
        self.state.step, self.state.epoch, self.state.position = (files["state"][k] for k in ("step", "epoch", "position"))
        if self.main:
            truncate_metrics(self.metrics_file, self.state.step)
        logger.info("resumed from %s (step %d)", self.start_from, self.state.step)

    # ----------------------------------------------------------------- one step

    def optimizer_step(self, batches: list[dict[str, Any]], signals: StopSignals) -> None:
        """Forward and backward of one optimiser step's micro-batches (gradients synchronised at the last one only),
        then clip and step. Every loss is divided by the step's totals over all micro-batches and ranks."""
        accelerator, state = self.accelerator, self.state
        totals = objective.step_totals(accelerator, batches)
        step_loss = step_kl = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(batches):
            tokens, last = int(batch["attention_mask"].sum()), i == len(batches) - 1
            if self.anchor_cache is not None:
                with self.accelerator.autocast():  # the precision the forward would compute them in
                    prefix = self.anchor_cache.prefix(self.model.anchor, batch["input_ids"], batch["attention_mask"])
                batch = {**batch, "anchor_prefix": prefix}
            with self.layout.micro_batch(accelerator, self.wrapped, last):
                loss, kl = objective.micro_batch_loss(self.wrapped, self.model, batch, totals,
                                                      self.config.preserve_weight, accelerator.num_processes)
                self.layout.backward(accelerator, self.wrapped, loss, last)
            state.nonfinite |= ~torch.isfinite(loss.detach())
            step_loss, step_kl = step_loss + loss.detach(), step_kl + kl
            state.position += 1
            state.window_tokens += tokens
        self._check_step(signals)
        norm = self.layout.step(self.wrapped, self.optimizer)
        if norm is not None:
            self._check_stepped_norm(norm)
        self.scheduler.step()
        self.optimizer.zero_grad()
        state.window_losses.append(step_loss)
        if self.preserve_dataset is not None:
            state.window_kl.append(step_kl)

    def _check_step(self, signals: StopSignals) -> None:
        """Before the optimiser step: clip, and stop the run (nothing of this step applied) on a NaN/inf anywhere."""
        state = self.state
        if self.config.max_grad_norm is not None and not self.layout.clips_in_step:
            state.grad_norm = self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
            if sharding.is_sharded(state.grad_norm):  # FSDP2: the norm over every rank's shards
                state.grad_norm = state.grad_norm.full_tensor()
            if isinstance(state.grad_norm, torch.Tensor):
                state.nonfinite |= ~torch.isfinite(state.grad_norm.detach()).to(state.nonfinite.device)
        diverged, state.stop = engine.agree_across_ranks(self.accelerator, state.nonfinite, signals.received)
        if diverged:
            stop_diverged(state.step + 1, state.epoch, self.checkpoints, self.metrics_file if self.main else None)
        state.nonfinite = torch.zeros_like(state.nonfinite)

    def _check_stepped_norm(self, norm: torch.Tensor) -> None:
        """After a step that clipped itself (ZeRO-3): its gradient norm (every rank has it), and the run stopped when
        it was not finite (the step was then skipped: nothing of it applied)."""
        self.state.grad_norm = norm if self.config.max_grad_norm is not None else None
        if not torch.isfinite(norm):
            stop_diverged(self.state.step + 1, self.state.epoch, self.checkpoints,
                          self.metrics_file if self.main else None)

    def after_step(self) -> bool:
        """Bookkeeping after an optimiser step: epoch end, logging, evaluation, checkpoint. Returns True to stop."""
        state = self.state
        state.step += 1
        self.progress.update(1)
        if state.position == len(self.loader):  # the epoch is over: the next step starts the next one
            self._record({"kind": "epoch", "step": state.step, "epoch": state.epoch,
                          "seconds": time.perf_counter() - state.epoch_start})
            state.epoch, state.position = state.epoch + 1, 0
            state.epoch_start = time.perf_counter()
        if state.step % self.config.log_every == 0 or state.step == self.total_steps:
            self.log_train()
        if self.eval_data is not None and (
            (self.config.eval_every and state.step % self.config.eval_every == 0) or state.step == self.total_steps
        ):
            state.last_eval = self.evaluate()
        state.saved_at = None
        if self.config.save_every and (state.step % self.config.save_every == 0 or state.step == self.total_steps):
            state.saved_at = self.save()
        if state.step >= self.total_steps:
            state.stop = None  # the run is complete: a late signal changes nothing
            return True
        if state.stop is not None:
            state.saved_at = state.saved_at or self.save()
            return True
        return False

    def log_train(self) -> None:
        """Append the logging window's train record (loss, lr, gradient norm, tokens/s) and start a new window."""
        state = self.state
        seconds = time.perf_counter() - state.window_start
        state.last_loss, tokens = engine.mean_over_ranks(self.accelerator, state.window_losses, state.window_tokens)
        record = {
            "kind": "train",
            "step": state.step,
            "epoch": state.step / self.steps_per_epoch,
            "loss": state.last_loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": None if state.grad_norm is None else float(state.grad_norm),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
        }
        if state.window_kl:  # the mean KL from the anchor on the preservation texts, per position (every rank has it)
            record["preserve_kl"] = engine.mean_over_ranks(self.accelerator, state.window_kl, 0)[0]
        self._record(record)
        self.progress.set_postfix(loss=f"{state.last_loss:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
        state.window_losses, state.window_tokens, state.window_start = [], 0, time.perf_counter()
        state.window_kl = []

    # ----------------------------------------------------------------- evaluate and save

    def evaluate(self) -> dict[str, Any]:
        """Eval loss over the eval data and, for prompt/completion data, exact match and chrF of greedy completions."""
        self.wrapped.eval()
        eval_loader = DataLoader(self.eval_data, batch_size=self.eval_batch_size, collate_fn=self.collator)
        loss, tokens = evaluate_loss(self.wrapped, eval_loader, device=self.accelerator.device)
        record: dict[str, Any] = {"kind": "eval", "step": self.state.step, "eval_loss": loss, "eval_tokens": tokens}
        if (
            self.config.eval_generate
            and self.tokenizer is not None
            and hasattr(self.model, "generate")
            and getattr(self.eval_dataset, "has_completions", False)
        ):
            with self.accelerator.autocast():
                scores = completion_scores(self.model, self.eval_dataset, self.tokenizer, self.eval_batch_size,
                                           self.config.eval_max_new_tokens, self.config.eval_generate_max_examples)
            record.update(eval_exact_match=scores["exact_match"], eval_chrf=scores["chrf"])
        self.wrapped.train()
        self._record(record)
        return record

    def composition_writer(self) -> Callable[[Path], None]:
        """What writes the composition into a directory (rank 0 calls it). Every rank calls this: under FSDP2 the
        weights are gathered from the shards here, under ZeRO-3 from the partitions."""
        weights = self.layout.full_composition(self.model)
        return lambda path: save_composition(self.model, path, weights=weights, metadata=self.metadata)

    def save(self) -> Path:
        """Write ``checkpoints/step-N`` (rank 0), keeping the newest ``keep_last``; every rank waits for it."""
        state = self.state
        write_composition = self.composition_writer()
        optimizer_state = self.layout.full_optimizer_state(self.optimizer, self.parameters)
        if self.main:
            bookkeeping = {
                "step": state.step,
                "epoch": state.epoch,
                "position": state.position,
                "total_steps": self.total_steps,
                "num_examples": len(self.train_dataset),
                "num_processes": self.accelerator.num_processes,
                "data_sha256": self.data_sha,
                "config": self.config.to_dict(),
            }
            save_checkpoint(self.checkpoints, state.step, write_composition, optimizer_state, self.scheduler,
                            bookkeeping, self.config.keep_last)
        self.accelerator.wait_for_everyone()
        return self.checkpoints / f"step-{state.step}"

    def _record(self, record: dict[str, Any]) -> None:
        if self.main:
            append_metrics(self.metrics_file, record)

    # ----------------------------------------------------------------- the loop

    def epoch_batches(self) -> Iterable[dict[str, Any]]:
        """The rest of the current epoch's micro-batches (all of them, or those after a resumed position)."""
        position = self.state.position
        batches = self.accelerator.skip_first_batches(self.loader, position) if position else self.loader
        batches.set_epoch(self.state.epoch)
        return batches

    def run(self) -> TrainingResult:
        """Set up, train until ``total_steps`` (or a stop signal), then save the composition; the output directory is
        locked meanwhile (another run there is refused, naming this one)."""
        self.check_inputs()  # before anything exists on disk: a refused run writes nothing
        with output_lock(self.output, "training") if engine.is_main_launch() else nullcontext():
            if self.on_locked is not None:
                self.on_locked()
            return self._run()

    def _run(self) -> TrainingResult:
        from tqdm.auto import tqdm

        self.setup()
        state = self.state
        self.progress = tqdm(total=self.total_steps, initial=state.step, desc="training",
                             disable=not (self.config.progress_bar and self.accelerator.is_local_main_process))
        state.window_start = state.epoch_start = time.perf_counter()
        self.wrapped.train()
        with StopSignals() as signals, self.progress:
            while state.step < self.total_steps and state.stop is None:
                for batches in objective.grouped_by_step(self.epoch_batches(), self.config.gradient_accumulation_steps):
                    self.optimizer_step(batches, signals)
                    if self.after_step():
                        break
        return self.finish()

    def finish(self) -> TrainingResult:
        """The result; a run that completed also writes ``composition/`` (atomically) and ``loss.png``."""
        state = self.state
        if state.stop is not None:
            name = signal.Signals(state.stop).name
            self._record({"kind": "interrupted", "step": state.step, "signal": name})
            logger.warning("%s: stopped at step %d of %d; resume from %s", name, state.step, self.total_steps,
                           state.saved_at)
            return TrainingResult(step=state.step, train_loss=state.last_loss, eval_metrics=state.last_eval,
                                  resumed_from=self.start_from, interrupted=name, checkpoint=state.saved_at)
        self.accelerator.unwrap_model(self.wrapped, keep_fp32_wrapper=False)  # the user's model without autocast
        composition_dir = self.output / COMPOSITION_DIR
        write_composition = self.composition_writer()
        if self.main:
            tmp = self.output / f".{COMPOSITION_DIR}.tmp-{os.getpid()}"
            try:
                write_composition(tmp)
                publish_directory(tmp, composition_dir)  # never weights of this run beside the JSON of an earlier one
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone once published; a failed save leaves nothing
            plot_losses(read_metrics(self.metrics_file), self.output / PLOT_NAME)
        self.accelerator.wait_for_everyone()
        return TrainingResult(step=state.step, train_loss=state.last_loss, eval_metrics=state.last_eval,
                              composition_dir=composition_dir, resumed_from=self.start_from)


def train(model: Any, train_dataset: Dataset, eval_dataset: Optional[Dataset] = None,
          config: Optional[TrainingConfig] = None, output_dir: Union[str, Path, None] = None, resume: bool = False,
          tokenizer: Any = None, preserve_dataset: Optional[Dataset] = None,
          on_locked: Optional[Callable[[], None]] = None) -> TrainingResult:
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
        preserve_dataset: ordinary texts (items with ``input_ids``) on which the composed model is trained to keep
            the anchor's own next-token distribution, with weight ``config.preserve_weight`` (beyond the paper).
        on_locked: called once the inputs are checked and ``output_dir`` is locked, before anything is written there
            (the CLI records its options then).
    Returns:
        a :class:`TrainingResult`.
    """
    return Recipe(model, train_dataset, eval_dataset, config, output_dir, resume, tokenizer, preserve_dataset,
                  on_locked).run()
