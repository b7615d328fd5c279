"""The key-value arithmetic experiment (paper §4.1, Table 1) end to end: bases, composition, baselines, scores."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...core.config import CompositionConfig
from ...model.composed import ComposedModel
from ...train.base_training import train_loop
from ..jobs import cpu_capability, cpu_model, run_jobs
from ..output import demo_output
from .config import PRESETS, KVPipelineConfig
from .task import Example, KVRepository, build_tokenizer, num_math_example
from .training import batches, percent_correct

DATASETS = ("KV-SUBS", "NUM-MATH", "KV-MATH")


# ----------------------------------------------------------------------------- data


def anchor_data(repo: KVRepository) -> Callable[[random.Random], Example]:
    """NUM-MATH over random numbers of the value range (the anchor never sees a key)."""

    def make(rng: random.Random) -> Example:
        return num_math_example(*next(repo.random_numbers(rng)))

    return make


def augment_data(repo: KVRepository) -> Callable[[random.Random], Example]:
    """KV-SUBS over every key (the augment memorises the repository)."""
    return lambda rng: repo.kv_subs(next(repo.expressions("all", rng)))


def composition_data(repo: KVRepository, num_math_mix: float) -> Callable[[random.Random], Example]:
    """D_C: KV-MATH over held-in keys only, mixed with NUM-MATH with probability ``num_math_mix``."""

    def make(rng: random.Random) -> Example:
        if rng.random() < num_math_mix:
            return num_math_example(*next(repo.random_numbers(rng)))
        return repo.kv_math(next(repo.expressions("held_in", rng)))

    return make


def evaluation_sets(repo: KVRepository) -> dict[str, list[Example]]:
    """The three datasets over the same held-out expressions."""
    exprs = repo.evaluation_expressions()
    return {
        "KV-SUBS": [repo.kv_subs(e) for e in exprs],
        "NUM-MATH": [repo.num_math(e) for e in exprs],
        "KV-MATH": [repo.kv_math(e) for e in exprs],
    }


# ----------------------------------------------------------------------------- models


def new_base(config: KVPipelineConfig, vocab_size: int, role: str, seed_offset: int = 0) -> nn.Module:
    """A randomly initialised Llama of the anchor's or the augment's size."""
    from ...testing import tiny_causal_lm

    layers, hidden, heads = (
        (config.anchor_layers, config.anchor_hidden, config.anchor_heads)
        if role == "anchor"
        else (config.augment_layers, config.augment_hidden, config.augment_heads)
    )
    seed = config.seed * 1000 + (1 if role == "anchor" else 2) + seed_offset
    return tiny_causal_lm("llama", vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          seed=seed, init_std=0.02, max_positions=64)


def train_lm(model: nn.Module, make: Callable, tokenizer: Any, steps: int, lr: float, config: KVPipelineConfig,
             seed: int, log: Optional[Callable[[str], None]]) -> float:
    """Train every weight of ``model`` on ``make``'s examples; returns seconds."""
    model.requires_grad_(True)  # a copy of a base that a ComposedModel froze
    model.train()
    seconds = train_loop(list(model.parameters()), lambda b: model(**b).loss,
                         batches(make, tokenizer, config.batch_size, seed), steps, lr, log)
    model.eval()
    return seconds


def unknown_keys(anchor: nn.Module, tokenizer: Any, repo: KVRepository) -> None:
    """Give every key the anchor's ``<unk>`` input embedding (in place), as if its vocabulary lacked the keys."""
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        table = anchor.get_input_embeddings().weight
        table[[vocab[k] for k in repo.keys]] = table[tokenizer.unk_token_id].clone()


def embedding_noise(model: nn.Module, scale: float, seed: int) -> Any:
    """Add seeded Gaussian noise (``scale`` x their RMS) to ``model``'s input embeddings while it is in training
    mode; returns the hook handle (``.remove()`` it after training)."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if not module.training or not scale:
            return out
        noise = torch.randn(out.shape, generator=generator).to(out)
        return out + noise * scale * out.detach().pow(2).mean().sqrt()

    return model.get_input_embeddings().register_forward_hook(hook)


def load_bases(folder: Path) -> tuple[nn.Module, nn.Module, Any]:
    """(anchor, augment, tokenizer) saved by :func:`load_or_train_bases` in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    anchor = AutoModelForCausalLM.from_pretrained(folder / "anchor").eval()
    augment = AutoModelForCausalLM.from_pretrained(folder / "augment").eval()
    return anchor, augment, tokenizer


def train_base(role: str, config: KVPipelineConfig, folder: str, progress: bool = False) -> float:
    """Train the anchor or the augment of ``config`` from scratch and save it to ``folder/role``.

    Self-contained (a worker process runs it): builds its own tokenizer, model and seeded data stream, so the
    result does not depend on which process trains it.

    Args:
        role: "anchor" (NUM-MATH, keys read as ``<unk>``, embedding noise) or "augment" (KV-SUBS over every key).
        progress: print a progress line every 250 steps.
    Returns:
        seconds spent training.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    repo = KVRepository(config.task)
    tokenizer = build_tokenizer(repo)
    model = new_base(config, len(tokenizer), role)
    log = (lambda m: print(f"[{role}] {m}", flush=True)) if progress else None
    if role == "anchor":
        if config.anchor_unknown_keys:
            unknown_keys(model, tokenizer, repo)
        noise = embedding_noise(model, config.anchor_embedding_noise, config.seed + 14)
        try:
            seconds = train_lm(model, anchor_data(repo), tokenizer, config.anchor_steps, config.anchor_lr, config,
                               config.seed + 11, log)
        finally:
            noise.remove()
    elif role == "augment":
        seconds = train_lm(model, augment_data(repo), tokenizer, config.augment_steps, config.augment_lr, config,
                           config.seed + 12, log)
    else:
        raise ValueError(f"Unknown base {role!r}; expected 'anchor' or 'augment'")
    model.save_pretrained(Path(folder) / role)
    return seconds


def load_or_train_bases(config: KVPipelineConfig, repo: KVRepository, cache_dir: Path,
                        log: Optional[Callable[[str], None]] = None) -> tuple[nn.Module, nn.Module, Any, dict]:
    """The tokenizer, anchor and augment from ``cache_dir/<fingerprint>``, trained and saved there when missing.

    With more than one worker (:func:`workers_for`) the anchor and the augment train side by side in two
    processes; the saved models are the same either way.

    Args:
        log: when given, each training prints its progress lines ("[anchor] step ...") itself.
    Returns:
        (anchor, augment, tokenizer, info) with info = {"cached": bool, "anchor_seconds", "augment_seconds"}.
    """
    folder = cache_dir / config.base_fingerprint()
    done = folder / "done.json"
    if done.exists():
        info = json.loads(done.read_text())
        return (*load_bases(folder), {**info, "cached": True})
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(repo).save_pretrained(folder / "tokenizer")
    roles = ("anchor", "augment")
    seconds = run_jobs(train_base, [(role, config, str(folder), log is not None) for role in roles],
                       min(len(roles), workers_for(config)))
    info = {f"{role}_seconds": round(s, 1) for role, s in zip(roles, seconds)}
    info["config"] = config.to_dict()
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, done)  # written last: a folder without done.json is retrained
    return (*load_bases(folder), {**info, "cached": False})


def lora_rank_for(model: nn.Module, budget: int) -> int:
    """The LoRA rank on every linear layer of the decoder blocks whose parameter count is closest to ``budget``."""
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and ".layers." in n)
    return max(1, round(budget / per_rank))


# ----------------------------------------------------------------------------- the experiment

# The rows trained on D_C, longest first (each is one job; with two workers CALM and its control run side by side).
TRAINED_ROWS = ("CALM", "CALM (random m_A)", "LoRA on m_B", "m_B fine-tuned on D_C")


def plain_generate(model: nn.Module, tokenizer: Any) -> Callable:
    """Greedy generation of one causal LM as :func:`score_all` calls it: (ids, mask, new tokens) -> ids."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return lambda ids, mask, n: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                               do_sample=False, eos_token_id=eos, pad_token_id=pad)


def composed_generate(model: ComposedModel, tokenizer: Any) -> Callable:
    """:func:`plain_generate` for a composed model."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return lambda ids, mask, n: model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)


def score_all(generate: Callable, evals: dict[str, list[Example]], tokenizer: Any) -> dict[str, float]:
    """Exact match (percent, one decimal) of ``generate`` on each dataset."""
    return {d: round(percent_correct(generate, evals[d], tokenizer), 1) for d in DATASETS}


def composition_config(config: KVPipelineConfig) -> CompositionConfig:
    """The CALM connections of the experiment."""
    return CompositionConfig(connections=config.connections, rotary=config.rotary, num_heads=config.compose_heads)


def train_row(name: str, config: KVPipelineConfig, bases_dir: str, progress: bool = False) -> dict[str, Any]:
    """Train one row of :data:`TRAINED_ROWS` on D_C from the cached bases and score it.

    Self-contained (a worker process runs it): loads the bases from ``bases_dir``, seeds itself, so a row's
    result does not depend on which process runs it or in which order.

    Returns:
        {"row": {dataset: accuracy, "trainable_params", ...}, "seconds": {"train NAME", "eval NAME"}}.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    anchor, augment, tokenizer = load_bases(Path(bases_dir))
    repo = KVRepository(config.task)
    log = (lambda m: print(f"[{name}] {m}", flush=True)) if progress else None
    d_c = batches(composition_data(repo, config.num_math_mix), tokenizer, config.batch_size, config.seed + 13)
    extra: dict[str, Any] = {}
    if name in ("CALM", "CALM (random m_A)"):
        if name != "CALM":  # the ablation: an augment of the same shape that never learned the keys
            augment = new_base(config, len(tokenizer), "augment", seed_offset=500)
        torch.manual_seed(config.seed)
        model = ComposedModel(anchor, augment, composition_config(config)).train()
        trainable = model.composition_parameters()
        seconds = train_loop(trainable, lambda b: model(**b).loss, d_c, config.compose_steps, config.compose_lr, log)
        generate = composed_generate(model.eval(), tokenizer)
    elif name == "LoRA on m_B":
        from peft import LoraConfig, get_peft_model

        calm = ComposedModel(anchor, augment, composition_config(config))
        rank = lora_rank_for(anchor, sum(p.numel() for p in calm.composition_parameters()))
        torch.manual_seed(config.seed)
        model = get_peft_model(anchor, LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        seconds = train_loop(trainable, lambda b: model(**b).loss, d_c, config.baseline_steps or config.compose_steps,
                             config.lora_lr, log)
        generate = plain_generate(model.eval(), tokenizer)
        extra["lora_rank"] = rank
    elif name == "m_B fine-tuned on D_C":
        seconds = train_lm(anchor, composition_data(repo, config.num_math_mix), tokenizer,
                           config.baseline_steps or config.compose_steps, config.finetune_lr, config, config.seed + 13, log)
        trainable = list(anchor.parameters())
        generate = plain_generate(anchor, tokenizer)
    else:
        raise ValueError(f"Unknown row {name!r}; expected one of {TRAINED_ROWS}")
    start = time.time()
    row = {**score_all(generate, evaluation_sets(repo), tokenizer), "trainable_params": sum(p.numel() for p in trainable), **extra}
    if log:
        log(", ".join(f"{d} {row[d]}%" for d in DATASETS))
    return {"row": row, "seconds": {f"train {name}": round(seconds, 1), f"eval {name}": round(time.time() - start, 1)}}


def workers_for(config: KVPipelineConfig) -> int:
    """Processes that train the D_C rows side by side: ``config.workers``, else cores // threads (one process
    when ``threads`` is 0, i.e. every core for one process)."""
    if config.workers:
        return config.workers
    if not config.threads:
        return 1
    return max(1, min(len(TRAINED_ROWS), (os.cpu_count() or 1) // config.threads))


def run_experiment(config: KVPipelineConfig, cache_dir: Path, log: Optional[Callable[[str], None]] = None) -> dict:
    """Train (or load) the bases, train CALM and the baselines on D_C, score every row on every dataset.

    Args:
        config: the experiment's scale.
        cache_dir: where base models are cached (a second run with the same bases skips their training).
        log: receives progress lines.
    Returns:
        a JSON-ready dict: config, per-row accuracies (percent) and parameter counts, seconds per phase.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.time()
    repo = KVRepository(config.task)
    anchor, augment, tokenizer, base_info = load_or_train_bases(config, repo, Path(cache_dir), log)
    evals = evaluation_sets(repo)
    seconds: dict[str, float] = {"bases": round(time.time() - start, 1)}
    rows: dict[str, dict[str, Any]] = {}
    for name, model in (("m_A", augment), ("m_B", anchor)):
        t = time.time()
        rows[name] = score_all(plain_generate(model, tokenizer), evals, tokenizer)
        seconds[f"eval {name}"] = round(time.time() - t, 1)
        if log:
            log(f"{name}: " + ", ".join(f"{d} {rows[name][d]}%" for d in DATASETS))
    jobs = [(name, config, str(Path(cache_dir) / config.base_fingerprint()), log is not None) for name in TRAINED_ROWS]
    workers = workers_for(config)
    t = time.time()
    done = run_jobs(train_row, jobs, workers)
    for name, out in zip(TRAINED_ROWS, done):
        rows[name] = out["row"]
        seconds.update(out["seconds"])
    seconds["D_C rows (wall)"] = round(time.time() - t, 1)
    seconds["total"] = round(time.time() - start, 1)
    return {
        "config": config.to_dict(),
        "held_in_keys": len(repo.held_in),
        "held_out_keys": len(repo.held_out),
        "eval_expressions": len(evals["KV-MATH"]),
        "key_blind_kv_math": repo.key_blind_ceiling(),  # the best a model that cannot tell keys apart can guess
        "workers": workers,
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),  # this process's; the workers start with the same environment
        "bases": {k: v for k, v in base_info.items() if k != "config"},
        "rows": rows,
        "seconds": seconds,
    }


def run_demo(output_dir: str, preset: str = "quick", progress: bool = True,
             config: Optional[KVPipelineConfig] = None, seed: int = 0) -> dict:
    """Run the key-value experiment and write results.json, results.md and results.png into ``output_dir``.

    Args:
        output_dir: where results go; base models are cached in ``output_dir/bases``.
        preset: "quick" (CPU, minutes) or "paper" (the paper's scale, for a GPU).
        progress: print progress lines.
        config: overrides the preset (and ``seed``).
        seed: the preset's seed: the task's keys, values and split, and every model and data stream.
    Returns:
        the results dict (also in results.json).
    """
    from .report import write_report

    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[preset](seed)
    with demo_output(Path(output_dir), "kv") as out:
        results = run_experiment(config, out / "bases", log=print if progress else None)
        results["preset"] = preset
        write_report(results, out)
    return results
