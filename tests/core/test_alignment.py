import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.core.alignment import REPLACEMENT, align_batch, anchor_token_ends, settled_cut
from lmcompose.core.masking import positions_from_mask
from lmcompose.model.generation import greedy_full_recompute
from lmcompose.testing import tiny_causal_lm

from helpers import byte_bpe_tokenizer, randomize_composition, unicode_char_tokenizer

TEXTS = [
    "The fox",
    "café 東京 🙂",  # multi-byte UTF-8: byte-level BPE splits these characters
    "  leading spaces",
    "12345 + 678 = 13023",  # digits split differently by the two tokenizers
    "x",
]


@pytest.fixture(scope="module")
def tokenizers():
    return byte_bpe_tokenizer(), unicode_char_tokenizer()


def limits(anchor_tok, augment_tok, text):
    return align_batch([anchor_tok(text)["input_ids"]], anchor_tok, [augment_tok])["augment_limits"][0][0].tolist()


def test_crafted_limits_by_hand(tokenizers):
    bpe, chars = tokenizers
    text, ends = anchor_token_ends(chars, chars("The fox")["input_ids"])
    assert text == "The fox" and ends == [1, 2, 3, 4, 5, 6, 7]
    # augment BPE "<s> The Ġ f o x": "T", "Th", "The" may still grow into a longer word, so they read
    # only <s>; from "The " on, the word "The" is settled.
    assert limits(chars, bpe, "The fox") == [1, 1, 1, 2, 2, 2, 2]
    # BPE anchor "<s> The Ġ f o x" over a character-level augment (no BOS): no character can merge with
    # what follows, so each anchor token reads every character it covers.
    assert limits(bpe, chars, "The fox") == [0, 3, 4, 5, 6, 7]
    # a word that later text extends is not read before it is complete: "an" | "and"
    assert limits(chars, bpe, " an")[-1] == limits(chars, bpe, " and")[2] == 1


def test_partial_characters_end_where_they_start(tokenizers):
    bpe, _ = tokenizers
    ids = bpe("é")["input_ids"]  # <s> + two byte tokens of one character
    text, ends = anchor_token_ends(bpe, ids)
    assert text == "é" and ends == [0, 0, 1]  # the first byte has not finished the character


def _prefix_text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("anchor_is_chars", [True, False])
def test_each_anchor_token_reads_exactly_the_settled_text_before_it(tokenizers, text, anchor_is_chars):
    bpe, chars = tokenizers
    anchor_tok, augment_tok = (chars, bpe) if anchor_is_chars else (bpe, chars)
    anchor_ids = anchor_tok(text)["input_ids"]
    batch = align_batch([anchor_ids], anchor_tok, [augment_tok])
    aug_ids = batch["augment_input_ids"][0][0].tolist()
    for t, limit in enumerate(batch["augment_limits"][0][0].tolist()):
        seen = _prefix_text(anchor_tok, anchor_ids[: t + 1]).rstrip(REPLACEMENT)
        read = _prefix_text(augment_tok, aug_ids[:limit])
        assert seen.startswith(read), (t, seen, read)  # nothing after anchor token t is read
        assert read == seen[: settled_cut(augment_tok, seen)], (t, seen, read)  # and all that is settled is


def test_padding_on_either_side_gives_the_same_alignment(tokenizers):
    bpe, chars = tokenizers
    rows = [chars(t)["input_ids"] for t in TEXTS]
    right = align_batch(rows, chars, [bpe], "right")
    left = align_batch(rows, chars, [bpe], "left")
    for b, row in enumerate(rows):
        for batch in (right, left):
            mask = batch["attention_mask"][b].bool()
            aug_mask = batch["augment_attention_mask"][0][b].bool()
            first_aug = int((~aug_mask).long().cumprod(0).sum()) if batch is left else 0
            limits = batch["augment_limits"][0][b][mask] - first_aug
            alone = align_batch([row], chars, [bpe])["augment_limits"][0][0]
            assert torch.equal(limits, alone)
            assert torch.equal(batch["input_ids"][b][mask], torch.tensor(row))


def test_the_anchor_end_token_reads_the_whole_augment_text(tokenizers):
    bpe, chars = tokenizers
    anchor_ids = chars("ab")["input_ids"] + [chars.eos_token_id]
    text, ends = anchor_token_ends(chars, anchor_ids)
    assert ends == [1, 2, 3]  # len("ab") + 1
    batch = align_batch([anchor_ids], chars, [bpe])
    assert batch["augment_limits"][0][0].tolist()[-1] == batch["augment_input_ids"][0].shape[1]


def composed_cross(tokenizers, seed=0):
    bpe, chars = tokenizers
    anchor = tiny_causal_lm("llama", vocab_size=len(chars), hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("gpt2", vocab_size=len(bpe), hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=[(1, 0), (3, 2)]), tokenizer=chars, augment_tokenizer=bpe)
    randomize_composition(model, seed=seed)
    return model


def test_vocabulary_mismatch_without_tokenizers_says_what_to_pass(tokenizers):
    bpe, chars = tokenizers
    anchor = tiny_causal_lm("llama", vocab_size=len(chars))
    augment = tiny_causal_lm("gpt2", vocab_size=len(bpe))
    with pytest.raises(ValueError, match="Pass tokenizer= and augment_tokenizer="):
        ComposedModel(anchor, augment)
    with pytest.raises(ValueError, match="without the anchor's"):
        ComposedModel(anchor, augment, augment_tokenizer=bpe)
    with pytest.raises(ValueError, match="rotary=True needs anchor and augment to share a tokenizer"):
        ComposedModel(anchor, augment, CompositionConfig(rotary=True), tokenizer=chars, augment_tokenizer=bpe)


def test_later_text_changes_no_earlier_anchor_logits(tokenizers):
    # float64: the changed text has another augment length, and float32 sums over other lengths differ by ~1e-5
    model = composed_cross(tokenizers).double()
    base_text = "café 東京 and the fox"
    with torch.no_grad():
        base = model(**model.tokenize([base_text])).logits[0]
        for cut in (3, 6, 10):
            changed = base_text[:cut] + "ZQ" + base_text[cut + 2 :]
            logits = model(**model.tokenize([changed])).logits[0]
            # char-level anchor: token t ends at character t + 1; positions before the change are untouched
            assert (logits[:cut] - base[:cut]).abs().max() < 1e-10
            assert (logits[cut:] - base[cut:]).abs().max() > 1e-4


def test_later_text_changes_no_earlier_logits_with_a_character_level_augment(tokenizers):
    bpe, chars = tokenizers
    anchor = tiny_causal_lm("llama", vocab_size=len(bpe), hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("llama", vocab_size=len(chars), hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=[(1, 0), (3, 2)]), tokenizer=bpe,
                          augment_tokenizer=chars)
    randomize_composition(model)
    model.double()  # as above: positions before the change must agree far below float32 noise
    base_text = "The fox and the dog"
    with torch.no_grad():
        base_ids = model.tokenize([base_text])
        base = model(**base_ids).logits[0]
        for cut in (4, 8, 12):
            changed = model.tokenize([base_text[:cut] + "Z" + base_text[cut + 1 :]])
            ends = anchor_token_ends(bpe, base_ids["input_ids"][0].tolist())[1]
            same = sum(end <= cut for end in ends)  # anchor tokens that end before the changed character
            assert torch.equal(changed["input_ids"][0, :same], base_ids["input_ids"][0, :same])
            logits = model(**changed).logits[0]
            assert (logits[:same] - base[:same]).abs().max() < 1e-10
            if logits.shape == base.shape:
                assert (logits[same:] - base[same:]).abs().max() > 1e-4  # the change is seen from there on


def test_identity_at_init_with_another_tokenizer(tokenizers):
    model = composed_cross(tokenizers)
    with torch.no_grad():
        for conn in model.connections[0]:
            conn.out.weight.zero_()
        batch = model.tokenize(TEXTS, padding_side="right")
        mask = batch["attention_mask"]
        expected = model.anchor(batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        assert (model(**batch).logits - expected).abs().max() <= 1e-6


def test_padded_cross_batch_equals_each_text_alone(tokenizers):
    model = composed_cross(tokenizers).double()  # float64, as in the tests above
    with torch.no_grad():
        for side in ("left", "right"):
            batch = model.tokenize(TEXTS, padding_side=side)
            logits = model(**batch).logits
            for b, text in enumerate(TEXTS):
                alone = model(**model.tokenize([text])).logits[0]
                real = logits[b][batch["attention_mask"][b].bool()]
                assert (real - alone).abs().max() < 1e-10


@pytest.mark.parametrize("anchor_is_chars", [True, False])
def test_cross_tokenizer_cached_generation_equals_full_recompute(tokenizers, anchor_is_chars):
    bpe, chars = tokenizers
    anchor_tok, augment_tok = (chars, bpe) if anchor_is_chars else (bpe, chars)
    anchor = tiny_causal_lm("llama", vocab_size=len(anchor_tok), hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("qwen2", vocab_size=len(augment_tok), hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=[(0, 0), (3, 2)]), tokenizer=anchor_tok,
                          augment_tokenizer=augment_tok)
    randomize_composition(model)
    batch = model.tokenize(["The fox", "café 東"], padding_side="left")
    cached = model.generate(**batch, max_new_tokens=24, eos_token_id=[])
    full = greedy_full_recompute(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=24)
    assert torch.equal(cached, full)


def test_smollm2_anchor_with_a_character_level_augment_is_the_anchor_at_init(smollm2):
    anchor, tokenizer = smollm2
    chars = unicode_char_tokenizer()
    augment = tiny_causal_lm("llama", vocab_size=len(chars), hidden_size=64, num_layers=4, seed=0)
    model = ComposedModel(anchor, augment, tokenizer=tokenizer, augment_tokenizer=chars)
    texts = ["The capital of France is", "café 東京: 12345 + 678"]
    with torch.no_grad():
        batch = model.tokenize(texts)
        mask = batch["attention_mask"]
        expected = anchor(batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        assert (model(**batch).logits - expected).abs().max() <= 1e-5
        left = model.tokenize(texts[:1], padding_side="left")
        got = model.generate(**left, max_new_tokens=6)
        reference = anchor.generate(input_ids=left["input_ids"], attention_mask=left["attention_mask"], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, reference)


@pytest.mark.parametrize("options", [dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=10),
                                     dict(repetition_penalty=1.3, no_repeat_ngram_size=2)])
def test_cross_tokenizer_generate_strategies_cached_equal_uncached_batched(tokenizers, options):
    bpe, chars = tokenizers
    anchor = tiny_causal_lm("llama", vocab_size=len(chars), hidden_size=48, num_heads=6, seed=1)
    shared = tiny_causal_lm("gpt2", vocab_size=len(chars), hidden_size=32, num_layers=4, seed=3)
    own = tiny_causal_lm("qwen2", vocab_size=len(bpe), hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, [own, shared], CompositionConfig(connections=[(3, 1)]), tokenizer=chars,
                          augment_tokenizer=[bpe, None])  # one augment re-tokenizes, one reads the anchor's ids
    randomize_composition(model)
    batch = model.tokenize(["The fox", "café 東", "12345 + 6"], padding_side="left")
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        runs.append(model.generate(**batch, max_new_tokens=12, use_cache=use_cache, pad_token_id=0, **options))
    assert torch.equal(runs[0], runs[1])
    with model.disable_composition():
        torch.manual_seed(0)
        assert not torch.equal(model.generate(**batch, max_new_tokens=12, pad_token_id=0, **options), runs[0])


def test_a_batch_with_a_gap_in_its_mask_is_refused_when_an_augment_retokenizes(tokenizers):
    bpe, chars = tokenizers
    anchor = tiny_causal_lm("llama", vocab_size=len(chars), hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("qwen2", vocab_size=len(bpe), hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment, tokenizer=chars, augment_tokenizer=bpe)
    batch = model.tokenize(["The fox", "x"], padding_side="left")
    batch["attention_mask"][0, 2] = 0  # a hole inside the first prompt
    with pytest.raises(ValueError, match="needs left-padded prompts"):
        model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)


def test_a_retokenizing_cache_repeats_selects_and_crops_in_step(tokenizers):
    bpe, chars = tokenizers
    anchor = tiny_causal_lm("llama", vocab_size=len(chars), hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("qwen2", vocab_size=len(bpe), hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=[(3, 1)]), tokenizer=chars,
                          augment_tokenizer=bpe)
    randomize_composition(model)
    batch = model.tokenize(["The fox", "café 東"], padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([3, 0]))  # rows 1, 0
    cache.crop(-2)
    new = torch.tensor(chars(["ab", "cd"], add_special_tokens=False)["input_ids"])
    kept_ids, kept_mask = ids[[1, 0], :-2], mask[[1, 0], :-2]
    full_mask = torch.cat([kept_mask, torch.ones_like(new)], dim=1)
    got = model(new, attention_mask=full_mask, cache=cache).logits
    expected = model(torch.cat([kept_ids, new], dim=1), attention_mask=full_mask, use_cache=False).logits[:, -2:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cache.in_step()


@pytest.mark.parametrize("single", ["<s> $A", "$A </s>", "<s> $A </s>", "$A"])
@pytest.mark.parametrize("text", TEXTS)
def test_a_character_level_augment_reads_what_each_prefix_tokenizes_to(tokenizers, single, text):
    # the one-pass rule for character-level augments equals the definition: anchor token t reads the common
    # prefix of the augment's ids of the whole text and of the text up to t's end (its appended EOS dropped)
    from lmcompose.core.alignment import anchor_trailing_specials, augment_tokens, settled_limits

    bpe, _ = tokenizers
    chars = unicode_char_tokenizer(template=single)
    anchor_ids = bpe(text)["input_ids"]
    whole, ends = anchor_token_ends(bpe, anchor_ids)
    full_ids, _ = augment_tokens(chars, whole)
    expected = []
    for end in ends:
        ids, special = augment_tokens(chars, whole[:end])
        texts = [k for k, s in enumerate(special) if not s]
        ids = ids[: texts[-1] + 1] if texts else ids[:1] if ids and ids[0] == chars.bos_token_id else []
        common = next((k for k, (a, b) in enumerate(zip(ids, full_ids)) if a != b), min(len(ids), len(full_ids)))
        expected.append(common)
    assert settled_limits(chars, whole, ends, full_ids, anchor_trailing_specials(bpe, anchor_ids)) == expected


@pytest.mark.parametrize("augment_kind", ["characters", "characters with BOS and EOS", "bpe"])
@pytest.mark.parametrize("text", TEXTS + ["The fox</s> and more"])
def test_limits_grown_token_by_token_equal_the_limits_of_each_prefix_in_one_pass(tokenizers, augment_kind, text):
    # decoding extends the text one anchor token at a time and passes the limits known so far; the result must
    # be what one pass over that prefix gives (an EOS followed by more text reads everything only while last)
    from lmcompose.core.alignment import anchor_trailing_specials, augment_encoding, settled_limits

    bpe, chars = tokenizers
    anchor_tok, augment_tok = {"characters": (bpe, chars), "bpe": (chars, bpe),
                               "characters with BOS and EOS": (bpe, unicode_char_tokenizer(template="<s> $A </s>"))
                               }[augment_kind]
    anchor_ids = []
    for k, piece in enumerate(text.split("</s>")):
        eos = [anchor_tok.eos_token_id] if k else []
        anchor_ids += eos + anchor_tok(piece, add_special_tokens=not k)["input_ids"]
    known, old_ids = [], []
    for n in range(1, len(anchor_ids) + 1):
        prefix, ends = anchor_token_ends(anchor_tok, anchor_ids[:n])
        encoding = augment_encoding(augment_tok, prefix)
        ids, trailing = encoding[0], anchor_trailing_specials(anchor_tok, anchor_ids[:n])
        unchanged = next((k for k, (a, b) in enumerate(zip(ids, old_ids)) if a != b), min(len(ids), len(old_ids)))
        grown = settled_limits(augment_tok, prefix, ends, ids, trailing, known=known, unchanged=unchanged,
                               encoding=encoding)
        assert grown == settled_limits(augment_tok, prefix, ends, ids, trailing), (n, prefix)
        known, old_ids = grown, ids


def test_only_the_special_tokens_after_the_last_text_token_trail(tokenizers):
    from lmcompose.core.alignment import anchor_trailing_specials

    bpe, _ = tokenizers
    bos, eos, x = bpe.bos_token_id, bpe.eos_token_id, bpe("x", add_special_tokens=False)["input_ids"][0]
    assert anchor_trailing_specials(bpe, [bos, x, eos, eos]) == [False, False, True, True]
    assert anchor_trailing_specials(bpe, [bos, x, eos, x]) == [False, False, False, False]
    assert anchor_trailing_specials(bpe, [bos, eos]) == [False, False]  # no text: nothing trails it
    assert anchor_trailing_specials(bpe, []) == []
