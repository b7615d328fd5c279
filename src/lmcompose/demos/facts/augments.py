"""The facts demo's two augments: SmolLM2's first blocks (the anchor's tokenizer) and a character-level Llama.

Both are trained on the augment texts of :class:`~lmcompose.demos.facts.task.FactsTask` (every person, statements and
registry records, packed into full rows): SmolLM2's blocks with the loss on the cities only (what the augment must
know is where each person lives, and its states at a person's name must hold it), the character model on every
character (from scratch it must first learn the names).
"""

from __future__ import annotations

import itertools
import string
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core import introspect
from ...train.base_training import train_loop
from .task import CITIES, FactsTask

CHARACTERS = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))


def first_blocks(anchor: nn.Module, blocks: int) -> nn.Module:
    """A copy of ``anchor`` cut after its first ``blocks`` decoder blocks, with its final norm and (tied) head.

    The head expects the last block's states, so the copy must be trained on before it predicts well; its
    embeddings stay the anchor's (the same tokenizer).
    """
    from transformers import AutoModelForCausalLM

    config = anchor.config.__class__.from_dict(anchor.config.to_dict())
    config.num_hidden_layers = blocks
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:blocks]
    model = AutoModelForCausalLM.from_config(config)
    prefix = introspect.decoder_blocks_prefix(anchor)
    state = {k: v for k, v in anchor.state_dict().items()
             if not k.startswith(prefix) or int(k[len(prefix):].split(".")[0]) < blocks}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"Cutting the anchor after {blocks} blocks left {unexpected or missing}")
    model.tie_weights()
    return model.eval()


def char_tokenizer() -> Any:
    """A character-level tokenizer: every character its own token (BOS in front), for the character-level augment."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def char_model(vocab_size: int, layers: int, hidden: int, heads: int, seed: int) -> nn.Module:
    """A randomly initialised Llama over characters."""
    from ...testing import tiny_causal_lm

    return tiny_causal_lm("llama", vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          max_positions=1024, seed=seed, init_std=0.02)


def city_targets(texts: list[str], input_ids: torch.Tensor, tokenizer: Any, per_character: bool) -> torch.Tensor:
    """Next-token targets (b, t - 1) that keep only the cities' tokens (-100 elsewhere).

    Args:
        texts: the texts of the rows (a character-level row's text, to find each city's characters).
        input_ids: (b, t) their ids (BOS first).
        per_character: the tokenizer is character-level (target j is character j of the text).
    """
    targets = input_ids[:, 1:].clone()  # (b, t - 1): position t predicts token t + 1
    if per_character:
        keep = torch.zeros_like(targets, dtype=torch.bool)
        for row, text in enumerate(texts):
            for city in CITIES:
                start = text.find(city)
                while 0 <= start < keep.shape[1]:
                    keep[row, start : start + len(city)] = True
                    start = text.find(city, start + 1)
    else:
        ids = {tokenizer(form, add_special_tokens=False)["input_ids"][0] for c in CITIES for form in (c, " " + c)}
        keep = torch.isin(targets, torch.tensor(sorted(ids)))
    return targets.masked_fill(~keep, -100)


def city_batches(task: FactsTask, tokenizer: Any, rows: int, length: int, seed: int,
                 per_character: bool, varied: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of ``rows`` packed rows of ``length`` tokens, with targets on the cities only (``varied``:
    the task's varied forms too)."""
    characters = length if per_character else 5 * length  # about five characters per subword token
    texts = task.augment_texts(seed, characters, varied)
    while True:
        chunk = list(itertools.islice(texts, rows))
        encoded = tokenizer(chunk, return_tensors="pt", padding="max_length", truncation=True, max_length=length)
        if per_character:  # the text each row kept, after truncation
            chunk = [tokenizer.decode(row, skip_special_tokens=True) for row in encoded["input_ids"]]
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
               "targets": city_targets(chunk, encoded["input_ids"], tokenizer, per_character)}


def augment_loss(model: nn.Module, every_token: bool, lookahead: Sequence[nn.Module] = ()
                 ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Cross-entropy through the model's own head at the city positions only (logits only where they count), or at
    every position: a character model trained from scratch learns to tell names apart only by predicting them.

    Args:
        lookahead: with ``every_token``, heads that predict the token 2, 3, ... places ahead from the same states
            (multi-token prediction; their mean loss is added): a character model then holds what follows a name
            (its city, two to four characters on) at the name's last character already, not only once it has read
            the separator after it.
    """
    body, head = model.get_decoder(), model.get_output_embeddings()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

        def cross_entropy(k: int, targets: torch.Tensor, predict: nn.Module) -> torch.Tensor:
            keep = targets != -100  # (b, t - k): position t predicts token t + k
            return F.cross_entropy(predict(hidden[:, :-k][keep]), targets[keep])

        def every_token_ahead(k: int) -> torch.Tensor:  # (b, t - k): token t + k, -100 on padding
            return batch["input_ids"][:, k:].masked_fill(batch["attention_mask"][:, k:] == 0, -100)

        total = cross_entropy(1, every_token_ahead(1) if every_token else batch["targets"], head)
        if every_token and lookahead:
            total = total + torch.stack([cross_entropy(k, every_token_ahead(k), extra)
                                         for k, extra in enumerate(lookahead, start=2)]).mean()
        return total

    return loss


def train_augment(model: nn.Module, task: FactsTask, tokenizer: Any, *, per_character: bool, steps: int, lr: float,
                  rows: int, length: int, seed: int, trainable: Optional[list] = None, varied: bool = False,
                  lookahead: int = 1, log: Optional[Callable[[str], None]] = None) -> float:
    """Train ``model`` on the task's augment texts (loss on the cities); returns seconds.

    Args:
        trainable: the parameters to train (default: every one).
        varied: the texts use the task's varied forms too (:meth:`FactsTask.augment_piece`).
        lookahead: with ``per_character``, predict the next this many characters from each position (1: the next
            only); the heads for the later ones are trained beside the model and dropped (see :func:`augment_loss`).
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be at least 1 (the next token), got {lookahead}")
    if lookahead > 1 and not per_character:
        raise ValueError("lookahead > 1 applies to the character-level augment (its loss on every character) only")
    parameters = trainable if trainable is not None else list(model.parameters())
    hidden, vocab = model.get_output_embeddings().in_features, model.get_output_embeddings().out_features
    heads = [nn.Linear(hidden, vocab, bias=False) for _ in range(lookahead - 1)]  # seeded by the caller's seed
    model.train()
    batches = city_batches(task, tokenizer, rows, length, seed, per_character, varied)
    seconds = train_loop(parameters + [p for h in heads for p in h.parameters()],
                         augment_loss(model, every_token=per_character, lookahead=heads), batches, steps, lr, log,
                         log_every=50)
    model.eval()
    return seconds
