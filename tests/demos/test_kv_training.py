"""demos/kv/training.py: encoding with label masks, right-padded batches, the percent of exact answers, the loop."""

import torch

from lmcompose.demos.kv.task import Example, KVRepository, KVTaskConfig, build_tokenizer
from lmcompose.demos.kv.training import batches, collate, encode, percent_correct
from lmcompose.train.base_training import train_loop


def test_encoding_masks_the_prompt_and_batches_pad_on_the_right():
    tok = build_tokenizer(KVRepository(KVTaskConfig(num_keys=20, value_max=3, num_eval=4)))
    vocab = tok.get_vocab()
    ids, labels = encode(vocab, Example("1 + 2 =", "3"), tok.bos_token_id, tok.eos_token_id)
    assert ids == [tok.bos_token_id, vocab["1"], vocab["+"], vocab["2"], vocab["="], vocab["3"], tok.eos_token_id]
    assert labels == [-100] * 5 + [vocab["3"], tok.eos_token_id]
    batch = collate([(ids, labels), (ids[:3], labels[:3])], tok.pad_token_id)
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100] * 7 and batch["input_ids"][1, 3:].tolist() == [tok.pad_token_id] * 4


def test_percent_correct_counts_continuations_equal_to_the_target_up_to_eos():
    tok = build_tokenizer(KVRepository(KVTaskConfig(num_keys=20, value_max=3, num_eval=4)))
    vocab, eos = tok.get_vocab(), tok.eos_token_id
    examples = [Example("1 + 2 =", "3"), Example("2 + 1 =", "3"), Example("1 + 1 =", "2")]

    def generate(ids, mask, n):  # always answers "3" then EOS, then junk
        answer = torch.tensor([[vocab["3"], eos, vocab["1"]]]).expand(ids.shape[0], -1)[:, :n]
        return torch.cat([ids, answer], 1)

    assert percent_correct(generate, examples, tok) == 100 * 2 / 3


def test_the_loop_lowers_the_loss_of_what_it_trains():
    tok = build_tokenizer(KVRepository(KVTaskConfig(num_keys=20, value_max=3, num_eval=4)))
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(len(tok)))
    data = batches(lambda rng: Example("1 + 2 =", "3"), tok, 4, seed=0)

    def loss(batch):
        targets = batch["labels"][batch["labels"] != -100]
        return torch.nn.functional.cross_entropy(weight.expand(len(targets), -1), targets)

    first = loss(next(data)).item()
    train_loop([weight], loss, data, steps=30, lr=0.1)
    assert loss(next(data)).item() < first / 2
