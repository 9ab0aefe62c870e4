"""Exact token bytes for byte-level BPE, SentencePiece-style and tiktoken vocabularies."""

import pytest

from blackbox_proxy.tokens.loaders import load_hosted_vocabulary, vocabulary_from_hf, vocabulary_from_tiktoken
from blackbox_proxy.tokens.vocab import Vocabulary, split_utf8

TEXTS = ["The café costs 12€ 🙂", "naïve 日本語 3.14159", "def f(x):\n    return x  # ok", "  spaces  and\ttabs"]


def test_split_utf8():
    euro = "€".encode()
    assert split_utf8(b"ab" + euro) == (b"ab" + euro, b"")
    assert split_utf8(b"ab" + euro[:2]) == (b"ab", euro[:2])
    assert split_utf8(euro[:1]) == (b"", euro[:1])
    # an invalid byte in the middle is not a tail: only a character cut off at the end is
    assert split_utf8(b"a\xff the dog") == (b"a\xff the dog", b"")
    assert split_utf8(b"\xa9 x" + euro[:1]) == (b"\xa9 x", euro[:1])


def test_invalid_bytes_in_the_middle_become_byte_tokens(tok_a):
    vocab = vocabulary_from_hf(tok_a)
    data = b"ab\xff the dog" + "é".encode()[:1]
    ids = vocab.encode_bytes(data)
    assert vocab.bytes_of(ids) == data
    assert vocab.byte_token(0xFF) in ids


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bytes_reproduce_text(tok_a, tok_b, text):
    for tok in (tok_a, tok_b):
        vocab = vocabulary_from_hf(tok)
        ids = tok.encode(text, add_special_tokens=False)
        assert vocab.bytes_of(ids) == text.encode()
        assert vocab.encode_text(text) == ids


def test_byte_level_partial_characters_have_exact_bytes(tok_a):
    vocab = vocabulary_from_hf(tok_a)
    # the tokenizer splits the emoji's 4 bytes over several tokens; decode() would give U+FFFD
    ids = tok_a.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    assert [vocab.token_bytes[i] for i in ids] != [tok_a.decode([i]).encode() for i in ids]
    assert vocab.bytes_of(ids) == "🙂".encode()
    # every single byte has a token, so any tail is expressible
    assert all(vocab.byte_token(b) is not None for b in range(256))


def test_special_tokens_and_ends(tok_a):
    vocab = vocabulary_from_hf(tok_a)
    eos = tok_a.convert_tokens_to_ids("<|endoftext|>")
    im_end = tok_a.convert_tokens_to_ids("<|im_end|>")
    assert vocab.token_bytes[eos] is None and vocab.token_bytes[im_end] is None
    assert {eos, im_end} <= vocab.end_ids
    assert vocab.special_text[eos] == "<|endoftext|>"
    assert vocab.unique_bytes


def _sentencepiece_tokenizer():
    """A tiny Gemma-style tokenizer: '▁' for spaces, <0xNN> byte fallback, no dummy prefix."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "<eos>", "<bos>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "c", "a", "f", "é", "▁c", "af", "▁caf", "▁café", "1", "2", "€", "T", "h", "e", "Th", "The", "s", "o", "t"]
    vocab = {p: i for i, p in enumerate(pieces + words)}
    merges = [("▁", "c"), ("a", "f"), ("▁c", "af"), ("▁caf", "é"), ("T", "h"), ("Th", "e")]
    model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=None)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    return fast


def test_canonical_id_resolves_byte_fallback_duplicates():
    tok = _sentencepiece_tokenizer()
    vocab = vocabulary_from_hf(tok)
    # 'c' exists as a piece and as the byte-fallback <0x63>: the encoder's choice wins
    assert set(vocab.ids_for_bytes(b"c")) == {tok.convert_tokens_to_ids("c"), tok.convert_tokens_to_ids("<0x63>")}
    assert vocab.canonical_id(b"c") == tok.convert_tokens_to_ids("c")
    assert not vocab.unique_bytes and vocab.same_as(vocabulary_from_hf(_sentencepiece_tokenizer()))


def test_sentencepiece_style_bytes():
    tok = _sentencepiece_tokenizer()
    vocab = vocabulary_from_hf(tok)
    text = "The café 12€ ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert vocab.bytes_of(ids) == text.encode()
    assert vocab.token_bytes[tok.convert_tokens_to_ids("▁café")] == " café".encode()
    assert vocab.token_bytes[tok.convert_tokens_to_ids("<0xE2>")] == b"\xe2"
    assert vocab.token_bytes[tok.convert_tokens_to_ids("<eos>")] is None
    assert tok.convert_tokens_to_ids("<eos>") in vocab.end_ids


def test_prefix_ranges_and_minimal_extensions():
    words = [b"a", b"ab", b"abc", b"abd", b"b", b"ba", b"\xff", b"\xff\xff", b"ac"]
    vocab = Vocabulary(words + [None], encode=lambda s: [], end_ids=[9], special_text={9: "</s>"})
    assert sorted(vocab.token_bytes[i] for i in vocab.prefix_ids(b"ab")) == [b"ab", b"abc", b"abd"]
    assert sorted(vocab.token_bytes[i] for i in vocab.prefix_ids(b"\xff")) == [b"\xff", b"\xff\xff"]
    assert vocab.prefix_ids(b"z") == ()
    # minimal extensions of "a": "ab" and "ac" ("abc" lies under "ab")
    assert vocab.minimal_extensions(b"a") == (b"ab", b"ac")
    assert vocab.minimal_extensions(b"ab") == (b"abc", b"abd")
    assert vocab.minimal_extensions(b"abc") == ()
    assert vocab.minimal_extensions(b"\xff") == (b"\xff\xff",)


def test_minimal_extensions_cover_every_longer_token_once(tok_a):
    vocab = vocabulary_from_hf(tok_a)
    for data in [b" t", b"e", b" th", b"1", b"\xc3"]:
        exts = vocab.minimal_extensions(data)
        longer = {b for b in vocab.token_bytes if b and b.startswith(data) and b != data}
        for b in longer:
            assert sum(b.startswith(e) for e in exts) == 1, (data, b)
        assert set(exts) <= longer


def test_tiktoken_offline():
    vocab = vocabulary_from_tiktoken("gpt-4o")
    assert vocab.name == "o200k_base"
    for text in TEXTS:
        assert vocab.bytes_of(vocab.encode_text(text)) == text.encode()
    assert vocab.end_ids  # <|endoftext|>
    assert load_hosted_vocabulary("tiktoken:cl100k_base").name == "cl100k_base"
