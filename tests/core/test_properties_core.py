"""Property-based tests: arbitrary and malformed inputs give results that hold their invariants or our clear errors."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcompose.core.alignment import REPLACEMENT, align_batch
from lmcompose.core.config import CompositionConfig, parse_connections

from helpers import byte_bpe_tokenizer, unicode_char_tokenizer

BPE, CHARS = byte_bpe_tokenizer(), unicode_char_tokenizer()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(texts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4), side=st.sampled_from(["left", "right"]),
       anchor_is_chars=st.booleans())
def test_alignment_of_any_text_reads_only_what_the_anchor_has_covered(texts, side, anchor_is_chars):
    anchor_tok, augment_tok = (CHARS, BPE) if anchor_is_chars else (BPE, CHARS)
    rows = [anchor_tok(t)["input_ids"] for t in texts]
    rows = [r for r in rows if r]
    if not rows:
        return
    batch = align_batch(rows, anchor_tok, [augment_tok], side)
    limits = batch["augment_limits"][0]
    aug_ids, aug_mask = batch["augment_input_ids"][0], batch["augment_attention_mask"][0]
    assert limits.shape == batch["input_ids"].shape
    for b, row in enumerate(rows):
        mask = batch["attention_mask"][b].bool()
        real_limits = limits[b][mask]
        assert (real_limits[1:] >= real_limits[:-1]).all()  # what a token reads is a growing prefix
        assert int(real_limits.max()) <= aug_ids.shape[1]
        offset = int((~aug_mask[b].bool()).long().cumprod(0).sum()) if side == "left" else 0
        aug_row = aug_ids[b][aug_mask[b].bool()].tolist()
        if augment_tok.unk_token_id is not None and augment_tok.unk_token_id in aug_row:
            continue  # the augment cannot spell this text back; nothing to compare by decoding
        for t, limit in enumerate(real_limits.tolist()):
            seen = anchor_tok.decode(row[: t + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            read = augment_tok.decode(aug_row[: max(0, limit - offset)], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
            assert seen.rstrip(REPLACEMENT).startswith(read)


@SETTINGS
@given(text=st.text(max_size=40))
def test_parse_connections_accepts_pairs_or_says_what_is_wrong(text):
    try:
        pairs = parse_connections(text)
    except ValueError as err:
        assert "AUGMENT_LAYER:ANCHOR_LAYER" in str(err)
    else:
        assert all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs)


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["num_connections", "connections", "num_heads", "norm", "rotary", "bogus"]),
                            st.one_of(st.none(), st.integers(-3, 5), st.text(max_size=5), st.booleans(),
                                      st.lists(st.tuples(st.integers(-2, 9), st.integers(-2, 9)), max_size=3))))
def test_config_from_any_dict_is_valid_or_a_clear_error(data):
    try:
        config = CompositionConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        assert str(err)
    else:
        assert CompositionConfig.from_json(config.to_json()) == config
