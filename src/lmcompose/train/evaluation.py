"""Metrics over a data set: token-level loss, exact match of greedy completions, chrF."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..core.padding import IGNORE_INDEX
from ..io.collate import collator_for
from ..model.completion import generate_completions


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of scored tokens (labels shifted as in transformers).

    Args:
        logits: (B, T, V).
        labels: (B, T), -100 where there is no target.
    Returns:
        (loss sum, token count), both 0-dim tensors; the loss in float32.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()


def token_kl_sum(anchor_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(anchor || model) of the next-token distributions at the positions where ``mask`` is 1.

    Args:
        anchor_logits: (B, T, V) of the anchor alone (the reference).
        logits: (B, T, V) of the model compared with it.
        mask: (B, T), 1 on the positions that count (not padding).
    Returns:
        (KL sum in nats, number of positions), both 0-dim tensors; float32.
    """
    reference = F.log_softmax(anchor_logits.float(), dim=-1)  # (B, T, V)
    kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), reference, log_target=True, reduction="none").sum(-1)  # (B, T)
    keep = mask.bool()
    return kl[keep].sum(), keep.sum()


@torch.no_grad()
def evaluate_loss(model: Any, batches: Iterable[dict[str, Any]], device: Optional[torch.device] = None) -> tuple[float, int]:
    """Token-weighted mean loss over batches (every scored token counts the same, whatever its batch).

    Args:
        model: a ComposedModel (or a wrapper of one).
        batches: collated batches (``input_ids``, ``attention_mask``, ``labels``, maybe ``augment_states``).
        device: where to move each batch; None leaves them where they are.
    Returns:
        (mean loss per token, number of tokens).
    """
    from accelerate.utils import send_to_device

    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in batches:
        if device is not None:
            batch = send_to_device(batch, device)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        loss, tokens = token_loss_sum(logits, batch["labels"])
        total += loss.double().cpu()
        count += int(tokens)
    return (total.item() / count if count else float("nan")), count


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after stripping surrounding whitespace."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        return float("nan")
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, 0-100) of hypotheses against one reference each."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score([h.strip() for h in hypotheses], [[r.strip() for r in references]]).score


def completion_scores(
    model: Any,
    dataset: Any,
    tokenizer: Any,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_examples: Optional[int] = None,
) -> dict[str, Any]:
    """Greedy-generate the completion of each prompt and score it against the reference.

    Each prompt gets at most as many new tokens as its reference completion has (EOS included),
    capped by ``max_new_tokens``: a longer generation cannot match anyway.

    Args:
        dataset: a prompt/completion :class:`~lmcompose.data.TokenizedDataset`.
        max_examples: score only the first N examples; None for all.
    Returns:
        ``{"exact_match", "chrf", "generated_examples", "completions"}``.
    """
    count = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    prompts = [dataset.prompt_ids(i) for i in range(count)]
    limits = [min(max_new_tokens, max(1, len(dataset.features[i]["input_ids"]) - len(prompts[i]))) for i in range(count)]
    hypotheses = generate_completions(model, tokenizer, prompts, limits, batch_size)
    references = dataset.references[:count]
    return {
        "exact_match": exact_match(hypotheses, references),
        "chrf": chrf(hypotheses, references),
        "generated_examples": count,
        "completions": hypotheses,
    }


def evaluate(
    model: Any,
    dataset: Any,
    tokenizer: Any = None,
    batch_size: int = 8,
    generate: bool = True,
    max_new_tokens: int = 64,
    max_examples: Optional[int] = None,
) -> dict[str, Any]:
    """Loss over a data set and, for prompt/completion data with a tokenizer, exact match and chrF.

    Args:
        model: a ComposedModel (inside ``disable_composition()``: the anchor alone).
        dataset: a :class:`~lmcompose.data.TokenizedDataset`.
        tokenizer: the anchor's tokenizer; needed for generation metrics.
        batch_size: examples per forward / generate call.
        generate: score greedy completions (exact match, chrF) when the data has completions.
        max_new_tokens: cap on generated tokens per prompt.
        max_examples: generate for only the first N examples (the loss always uses all).
    Returns:
        ``{"loss", "perplexity", "tokens", "examples"}`` plus ``exact_match``, ``chrf``,
        ``generated_examples`` and ``completions`` when generation ran.
    """
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator_for(model, tokenizer))
    was_training = model.training
    model.eval()
    try:
        loss, tokens = evaluate_loss(model, loader, device=model.device)
        metrics: dict[str, Any] = {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 50 else float("inf"),
            "tokens": tokens,
            "examples": len(dataset),
        }
        if generate and tokenizer is not None and getattr(dataset, "has_completions", False):
            metrics.update(completion_scores(model, dataset, tokenizer, batch_size, max_new_tokens, max_examples))
    finally:
        model.train(was_training)
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table of the scalar metrics."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for key, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
