"""Test helpers: tokenizers built offline, tiny saved base models, small JSONL tasks, randomised compositions."""

import json
import random
from pathlib import Path

import torch

from lmcompose.testing import tiny_causal_lm

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 :.,-=>")
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]  # ids 0, 1, 2, 3: the ids tiny_causal_lm's configs use


def char_tokenizer(add_bos: bool = True):
    """A character-level tokenizer (a BPE without merges) with BOS/EOS/pad, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


VOCAB = len(SPECIALS) + len(CHARS)


def tiny_pair(anchor_seed: int = 1, augment_seed: int = 2):
    """A tiny Llama anchor and a wider, deeper Llama augment over the character vocabulary."""
    anchor = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=anchor_seed)
    augment = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=48, num_layers=4, num_heads=4, seed=augment_seed)
    return anchor, augment


def save_bases(root: Path):
    """Save the anchor and augment (with the tokenizer) under ``root``; returns their directories."""
    anchor, augment = tiny_pair()
    tokenizer = char_tokenizer()
    paths = []
    for name, model in (("anchor", anchor), ("augment", augment)):
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def reverse_task(n: int, seed: int = 0):
    """Prompt/completion records: reverse a short word."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))
        records.append({"prompt": f"rev {word} =>", "completion": " " + word[::-1]})
    return records


def reverse_records(n: int, seed: int = 0, source: str = "memory"):
    """:func:`reverse_task` as in-memory :class:`lmcompose.io.jsonl.Records` (lines numbered from 1)."""
    from lmcompose.io.jsonl import Records

    rows = reverse_task(n, seed)
    return Records("completion", rows, list(range(1, n + 1)), source)


def train_config(**overrides):
    """A TrainingConfig for the tiny bases: batch 4, lr 1e-2, CPU, a log record every step, no progress bar."""
    from lmcompose.train.recipe import TrainingConfig

    base = dict(batch_size=4, learning_rate=1e-2, log_every=1, progress_bar=False, cpu=True)
    base.update(overrides)
    return TrainingConfig(**base)


def composition_weights(model):
    """A copy of the composition's weights, to compare across runs."""
    return {k: v.clone() for k, v in model.composition_state_dict().items()}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def randomize_composition(model, seed: int = 0, std: float = 0.3) -> None:
    """Give every composition weight (the zero output projection included) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.connections.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if "norm" in name and name.endswith("weight"):
                noise = noise + 1.0  # norm gains stay near one
            p.copy_(noise.to(p.dtype))


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Composition of language models: anchor and augment.",
    "Numbers 12345 and 678 + 90 = 768; café, naïve, 東京, emoji 🙂.",
    "  leading spaces, tabs\tand newlines\nare text too",
]


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained here on a tiny corpus (splits multi-byte characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def unicode_char_tokenizer(template=None):
    """A character-level tokenizer (a per-character pre-tokenizer, as alignment recognises) over CORPUS' characters
    (multi-byte ones included), with <unk> for others; no BOS, or with ``template`` the special tokens it places
    (e.g. "<s> $A </s>"; <s> takes the last id)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(CORPUS)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:+-=!?"))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if template is None:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
