"""core/tokens.py: prompts tokenized with the tokenizer's own BOS convention; when two tokenizers give the same ids."""

from lmcompose.core.tokens import adds_bos, encode_prompt, same_vocabulary

from helpers import byte_bpe_tokenizer, char_tokenizer


def test_a_prompt_gets_bos_only_from_a_tokenizer_that_adds_one():
    with_bos, without = char_tokenizer(add_bos=True), char_tokenizer(add_bos=False)
    assert adds_bos(with_bos) and not adds_bos(without)
    plain = without("ab", add_special_tokens=False)["input_ids"]
    assert encode_prompt(with_bos, "ab") == [with_bos.bos_token_id] + plain
    assert encode_prompt(without, "ab") == plain


def test_same_vocabulary():
    chars = char_tokenizer()
    assert same_vocabulary(chars, None) and same_vocabulary(chars, chars) and same_vocabulary(chars, char_tokenizer())
    assert not same_vocabulary(chars, byte_bpe_tokenizer()) and not same_vocabulary(None, chars)
