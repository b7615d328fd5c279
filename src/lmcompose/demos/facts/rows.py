"""The rows of the facts demo that train: the two augments, CALM with each, CALM with a random augment, LoRA on
SmolLM2 and SmolLM2 fine-tuned. Each is a self-contained job (a worker process runs it) that saves what it trained."""

from __future__ import annotations

import copy
import importlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ...core.config import CompositionConfig
from ...io.datasets import TokenizedDataset, tokenize_records
from ...io.jsonl import Records
from ...model.composed import ComposedModel
from ...model.hooks import head_at
from ...train import TrainingConfig, train
from ...train.base_training import train_loop
from ...train.objective import scored_positions
from .augments import char_model, char_tokenizer, first_blocks, train_augment
from .config import FactsPipelineConfig, compose_steps
from .task import DC_WORDINGS, KNOWN_PEOPLE, FactsTask, dc_templates

CALM_ROWS = ("CALM (same tokenizer)", "CALM (characters)", "CALM (random augment)")
BASELINE_ROWS = ("LoRA on SmolLM2", "SmolLM2 fine-tuned on D_C")
TRAINED_ROWS = CALM_ROWS + BASELINE_ROWS
# Modules whose docstrings are the preservation texts: English no one here wrote, and not the evaluation's text.
DOCSTRING_MODULES = ("os", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "threading",
                     "logging", "argparse", "datetime", "csv", "sqlite3", "email", "http.client", "urllib.request",
                     "shutil", "tempfile", "random", "statistics", "string", "textwrap", "unittest", "zipfile", "socket")


def row_folder_name(row: str) -> str:
    """A row's folder name: its name in lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def load_anchor(folder: Path) -> tuple[nn.Module, Any]:
    """SmolLM2-135M and its tokenizer from ``folder`` (saved there from the GGUF once, which loads in a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def save_anchor(folder: Path) -> None:
    """Dequantise the packaged GGUF of SmolLM2-135M once and save it as a transformers model directory."""
    from transformers import AutoModelForCausalLM

    from ...io.bases import load_base

    model, tokenizer = load_base("smollm2-135m")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else the saved model still says "gguf" and refuses save_pretrained
    plain = AutoModelForCausalLM.from_config(config)  # the GGUF-loaded model refuses save_pretrained
    plain.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def load_augment(kind: str, folder: Path) -> tuple[nn.Module, Optional[Any]]:
    """A trained augment and, for the character-level one, its tokenizer (None: it reads the anchor's ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder / kind).eval()
    return model, (AutoTokenizer.from_pretrained(folder / kind) if kind == "char" else None)


def train_augment_job(kind: str, config: FactsPipelineConfig, anchor_dir: str, folder: str,
                      progress: bool = False) -> float:
    """Train the ``"same"`` or ``"char"`` augment and save it to ``folder/kind``; returns seconds."""
    torch.set_num_threads(config.threads)
    task = FactsTask(config.task)
    log = (lambda m: print(f"[augment {kind}] {m}", flush=True)) if progress else None
    torch.manual_seed(config.seed * 1000 + (1 if kind == "same" else 2))
    if kind == "same":
        anchor, tokenizer = load_anchor(Path(anchor_dir))
        model = first_blocks(anchor, config.same_blocks)
        model.requires_grad_(False)  # the embeddings (the anchor's) stay; the blocks and final norm train
        trained = [p for i, b in enumerate(model.get_decoder().layers) if i >= config.same_trained_from
                   for p in b.parameters()] + list(model.get_decoder().norm.parameters())
        for p in trained:
            p.requires_grad_(True)
        seconds = train_augment(model, task, tokenizer, per_character=False, steps=config.same_steps,
                                lr=config.same_lr, rows=config.same_rows, length=config.same_length,
                                seed=config.seed + 21, trainable=trained, log=log)
    elif kind == "char":
        tokenizer = char_tokenizer()
        model = char_model(len(tokenizer), config.char_layers, config.char_hidden, config.char_heads, config.seed + 3)
        seconds = train_augment(model, task, tokenizer, per_character=True, steps=config.char_steps,
                                lr=config.char_lr, rows=config.char_rows, length=config.char_length,
                                seed=config.seed + 22, varied=config.char_varied,
                                lookahead=config.char_lookahead, log=log)
    else:
        raise ValueError(f"Unknown augment {kind!r}; expected 'same' or 'char'")
    model.save_pretrained(Path(folder) / kind)
    tokenizer.save_pretrained(Path(folder) / kind)
    return seconds


def composition_data(task: FactsTask, tokenizer: Any, wordings: Sequence[str] = tuple(DC_WORDINGS)
                     ) -> TokenizedDataset:
    """D_C: the held-in people in the named D_C ``wordings``, the loss on the city token (no end-of-text token after
    it)."""
    rows = task.composition_rows(wordings)
    records = Records(kind="completion", rows=rows, lines=list(range(1, len(rows) + 1)), source="D_C")
    return tokenize_records(records, tokenizer, append_eos=False)


def preservation_data(tokenizer: Any, length: int, known: float = 0.0, count: int = 2000, seed: int = 0,
                      wordings: Sequence[str] = tuple(DC_WORDINGS)) -> TokenizedDataset:
    """The ordinary text that keeps the anchor: windows of ``length`` tokens of standard-library docstrings, a
    ``known`` fraction of them replaced by D_C's ``wordings`` (names) about people who are not in the task (so "lives
    in" keeps meaning what SmolLM2 thinks when the person is not one of the augment's)."""
    templates = dc_templates(wordings)
    parts = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attribute in sorted(a for a in dir(module) if not a.startswith("_")):
            doc = getattr(getattr(module, attribute), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                parts.append(doc)
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + length] for i in range(0, min(len(ids) - length, length * count), length)]
    rng = random.Random(seed)
    questions = int(known * len(windows))
    for i in rng.sample(range(len(windows)), questions):
        prompt = rng.choice(templates).format(name=rng.choice(KNOWN_PEOPLE))
        windows[i] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return TokenizedDataset.from_token_ids(windows)


def calm_model(name: str, config: FactsPipelineConfig, anchor: nn.Module, tokenizer: Any,
               augments: dict[str, Any]) -> ComposedModel:
    """The composed model of a CALM row (fresh connections, seeded): the trained augment, or a random one.

    Args:
        augments: {kind: the folder its augment was saved in}.
    """
    kind = "char" if name == "CALM (characters)" else "same"
    augment, augment_tokenizer = load_augment(kind, Path(augments[kind]))
    if name == "CALM (random augment)":  # the control: the same architecture, weights never trained on the facts
        torch.manual_seed(config.seed + 500)
        augment = augment.__class__(augment.config).eval()
    connections = config.char_connections if kind == "char" else config.same_connections
    composition = CompositionConfig(connections=connections, num_heads=config.compose_heads,
                                    null_attention=config.null_attention, null_score=config.null_score)
    torch.manual_seed(config.seed)
    return ComposedModel(anchor, augment, composition, tokenizer=tokenizer, augment_tokenizer=augment_tokenizer)


def train_row_job(name: str, config: FactsPipelineConfig, anchor_dir: str, augments: dict[str, str], row_dir: str,
                  progress: bool = False) -> dict[str, Any]:
    """Train one row of :data:`TRAINED_ROWS` on D_C and save it to ``row_dir``; returns its seconds and figures.

    Args:
        augments: {kind: the folder its augment was saved in}.
    """
    torch.set_num_threads(config.threads)
    anchor, tokenizer = load_anchor(Path(anchor_dir))
    task, out = FactsTask(config.task), Path(row_dir)
    d_c = composition_data(task, tokenizer, config.dc_wordings)
    log = (lambda m: print(f"[{name}] {m}", flush=True)) if progress else None
    started = time.time()
    if name in CALM_ROWS:
        model = calm_model(name, config, anchor, tokenizer, augments)
        steps = compose_steps(config, name)
        training = TrainingConfig(max_steps=steps, batch_size=config.compose_batch,
                                  learning_rate=config.compose_lr, warmup_steps=max(1, steps // 10),
                                  preserve_weight=config.preserve_weight, preserve_ratio=config.preserve_ratio,
                                  cache_anchor_states=config.cache_anchor_states,
                                  eval_generate=False, progress_bar=progress, seed=config.seed, cpu=True)
        result = train(model, d_c, None, training, out / "run", tokenizer=tokenizer, resume=True,
                       preserve_dataset=preservation_data(tokenizer, config.preserve_length, config.preserve_known,
                                                          seed=config.seed, wordings=config.dc_wordings))
        if result.interrupted:  # never a done.json for a row that did not finish: the next run resumes it
            raise InterruptedError(f"{name}: stopped by {result.interrupted} at step {result.step} of "
                                   f"{steps}; run the demo again to continue from its checkpoint")
        figures = {"trainable_params": sum(p.numel() for p in model.composition_parameters()),
                   "train_loss": result.train_loss}
    elif name in BASELINE_ROWS:
        figures = _train_baseline(name, config, anchor, tokenizer, d_c, out, augments, log)
    else:
        raise ValueError(f"Unknown row {name!r}; expected one of {TRAINED_ROWS}")
    figures["train_seconds"] = round(time.time() - started, 1)
    (out / "done.json").write_text(json.dumps(figures, indent=2))
    return figures


def lora_rank_for(model: nn.Module, budget: int) -> int:
    """The LoRA rank on every linear layer of the decoder blocks whose parameter count is closest to ``budget``."""
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and ".layers." in n)
    return max(1, round(budget / per_rank))


def _train_baseline(name: str, config: FactsPipelineConfig, anchor: nn.Module, tokenizer: Any, d_c: TokenizedDataset,
                    out: Path, augments: dict[str, str], log: Optional[Callable[[str], None]]) -> dict[str, Any]:
    """LoRA on the anchor with CALM's parameter count, or every weight of the anchor, trained on D_C."""
    from ...io.collate import Collator

    batches = _epochs(d_c, Collator(tokenizer.pad_token_id), config.compose_batch, config.seed)
    if name == "LoRA on SmolLM2":
        from peft import LoraConfig, get_peft_model

        calm = calm_model("CALM (same tokenizer)", config, anchor, tokenizer, augments)
        rank = lora_rank_for(anchor, sum(p.numel() for p in calm.composition_parameters()))
        torch.manual_seed(config.seed)
        model = get_peft_model(anchor, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        lr, extra = config.lora_lr, {"lora_rank": rank}
    else:
        model, lr, extra = anchor, config.finetune_lr, {}
        model.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = anchor.get_output_embeddings()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with head_at(head, scored_positions(batch["labels"], batch["attention_mask"], None)):  # the city token only
            return model(**batch).loss

    model.train()
    train_loop(trainable, loss, batches, config.baseline_steps, lr, log, log_every=50)
    model.eval()
    model.save_pretrained(out / "model")
    return {"trainable_params": sum(p.numel() for p in trainable), **extra}


def _epochs(dataset: TokenizedDataset, collate: Any, batch_size: int, seed: int):
    """Endless shuffled batches of ``dataset``, one seeded permutation per epoch."""
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([dataset[i] for i in order[start : start + batch_size]])
        epoch += 1
