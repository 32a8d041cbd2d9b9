"""Byte-level BPE: incremental training equals a from-scratch recount, HF parity, round trips, BPE-dropout."""
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer

from lmstack.errors import LmstackError
from lmstack.tokenizer import load_tokenizer, train_tokenizer
from lmstack.tokenizer.bpe_train import train_bpe
from lmstack.tokenizer.pretokenizers import BYTE_TO_CHAR, GPT4_PATTERN, to_byte_level


def naive_bpe_merges(word_counts: dict[str, int], n_symbols: int) -> list[list[str]]:
    """Reference: recount every pair over the whole corpus before each merge (no incremental updates)."""
    symbols = [BYTE_TO_CHAR[b] for b in range(256)]
    index = {s: i for i, s in enumerate(symbols)}
    words = {tuple(index[c] for c in w): c for w, c in word_counts.items()}
    merges = []
    while len(symbols) < n_symbols:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        best = min((p for p in pairs if pairs[p] >= 2), key=lambda p: (-pairs[p], p), default=None)
        if best is None:
            break
        s = symbols[best[0]] + symbols[best[1]]
        if s not in index:
            index[s] = len(symbols)
            symbols.append(s)
        merges.append([symbols[best[0]], symbols[best[1]]])
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(index[s])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def test_incremental_training_matches_full_recount(corpus):
    import regex

    counts = Counter(to_byte_level(p) for p in regex.findall(GPT4_PATTERN, corpus[:20000]))
    model = train_bpe(dict(counts), vocab_size=256 + 150, specials=[], byte_level=True, min_frequency=2)
    assert model["merges"] == naive_bpe_merges(dict(counts), 256 + 150)
    assert len(model["vocab"]) == 256 + 150


def test_special_tokens_come_first_and_vocab_size(bpe_tok):
    assert bpe_tok.vocab_size == 600
    assert bpe_tok.bos_id == 0 and bpe_tok.eos_id == 1 and bpe_tok.pad_id == 2
    specials = sorted(bpe_tok.special_ids)
    assert specials == list(range(len(specials))) and len(specials) == 14
    assert bpe_tok.token_to_id("<|assistant_end|>") in specials
    assert bpe_tok.id_to_token(0) == "<|bos|>" and bpe_tok.token_to_id("not a token at all") is None
    # Every byte is a token, so nothing is unknown.
    assert all(bpe_tok.token_to_id(BYTE_TO_CHAR[b]) is not None for b in range(256))


def test_parity_with_tokenizers_runtime(bpe_tok, samples, tmp_path, corpus):
    bpe_tok.save(tmp_path)
    rust = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in samples + [corpus[:5000]]:
        ours = bpe_tok.encode(text)
        assert ours == rust.encode(text, add_special_tokens=False).ids
        assert bpe_tok.encode(text, add_special_tokens=True) == rust.encode(text).ids
        assert bpe_tok.decode(ours) == rust.decode(ours, skip_special_tokens=False) == text
        assert bpe_tok.decode(ours, skip_special_tokens=True) == rust.decode(ours)
    assert bpe_tok.encode("x", add_special_tokens=True)[0] == bpe_tok.bos_id


def test_save_load_roundtrip_and_batch_path(bpe_tok, samples, tmp_path):
    bpe_tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    loaded_file = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert loaded.fast() is not None
    assert loaded.encode_batch(samples) == [bpe_tok.encode(s) for s in samples]
    assert loaded_file.encode_batch(samples, allow_special=False) == [bpe_tok.encode(s, allow_special=False)
                                                                     for s in samples]
    assert loaded.special_tokens == bpe_tok.special_tokens and loaded.vocab_size == bpe_tok.vocab_size


text_strategy = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) | st.sampled_from(
    ["\x00", "🙂🙂", "e\u0301\u0302", "  \n\t ", "<|bos|>", "a<|eos|>b", "1234567", "\u200d\u2028"])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=text_strategy)
def test_byte_level_roundtrip_any_unicode(tiny_bpe, text):
    ids = tiny_bpe.encode(text)
    assert tiny_bpe.decode(ids) == text
    assert tiny_bpe.decode(tiny_bpe.encode(text, allow_special=False)) == text


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(text_strategy, min_size=1, max_size=5))
def test_fast_path_matches_python_reference(tiny_bpe, texts):
    assert tiny_bpe.encode_batch(texts) == [tiny_bpe.encode(t) for t in texts]
    assert tiny_bpe.encode_batch(texts, allow_special=False) == [tiny_bpe.encode(t, allow_special=False)
                                                                 for t in texts]


@pytest.fixture(scope="module")
def tiny_bpe(corpus):
    return train_tokenizer(texts=[corpus[:8000]], type="bpe", vocab_size=330, show_progress=False)


def test_bpe_dropout_only_at_training_time(corpus):
    tok = train_tokenizer(texts=[corpus], type="bpe", vocab_size=600, dropout=0.3, show_progress=False)
    text = "the people would have made another world"
    deterministic = tok.encode(text)
    assert all(tok.encode(text) == deterministic for _ in range(5))
    assert tok.encode_batch([text]) == [deterministic]
    sampled = [tok.encode(text, train=True) for _ in range(20)]
    assert any(s != deterministic for s in sampled)
    assert all(tok.decode(s) == text for s in sampled)
    assert sum(map(len, sampled)) / len(sampled) > len(deterministic)  # dropped merges -> more tokens
    batch = tok.encode_batch([text] * 8, train=True)  # the batch path honours train=True too
    assert all(tok.decode(b) == text for b in batch) and any(b != deterministic for b in batch)
    tok.set_regularization(dropout=0.0)
    assert tok.encode(text, train=True) == deterministic


def test_training_is_deterministic(corpus):
    a = train_tokenizer(texts=[corpus], type="bpe", vocab_size=500, show_progress=False)
    b = train_tokenizer(texts=[corpus], type="bpe", vocab_size=500, show_progress=False, num_workers=2)
    assert a.spec["model"]["merges"] == b.spec["model"]["merges"]


def test_gpt2_pattern_and_metaspace_bpe_parity(corpus, samples, tmp_path):
    for kw in ({"pretokenizer": "gpt2"}, {"pretokenizer": "metaspace"}):
        tok = train_tokenizer(texts=[corpus], type="bpe", vocab_size=700, show_progress=False, **kw)
        tok.save(tmp_path / kw["pretokenizer"])
        rust = RustTokenizer.from_file(str(tmp_path / kw["pretokenizer"] / "tokenizer.json"))
        for text in samples:
            assert tok.encode(text) == rust.encode(text, add_special_tokens=False).ids, (kw, text)
    # metaspace BPE keeps unseen characters as bytes (byte fallback), so nothing becomes unknown
    ids = tok.encode("ᚠᛇᚻ")
    assert all(tok.id_to_token(i).startswith("<0x") for i in ids if tok.id_to_token(i) != "\u2581")
    assert tok.decode(ids) == "ᚠᛇᚻ"


def test_vocab_size_smaller_than_alphabet_is_an_error(corpus):
    with pytest.raises(LmstackError, match=r"vocab_size=100 is smaller than the base alphabet \(256"):
        train_tokenizer(texts=[corpus], type="bpe", vocab_size=100, show_progress=False)
    with pytest.raises(LmstackError, match="use vocab_size >= 270"):
        train_tokenizer(texts=[corpus], type="bpe", vocab_size=269, show_progress=False)


def test_merges_never_spell_a_special_token():
    text = "<|bos|>" * 200 + " x<|bos|>y " * 50
    tok = train_tokenizer(texts=[text], type="bpe", vocab_size=300, pretokenizer="metaspace",
                          special_tokens="chat", show_progress=False)
    merges = tok.spec["model"]["merges"]
    assert len(merges) > 5
    assert all(a + b not in tok.special_tokens.values() for a, b in merges)
    assert not set(tok.encode(text, allow_special=False)) & tok.special_ids


def test_dropout_rng_is_seeded(corpus):
    tok = train_tokenizer(texts=[corpus], type="bpe", vocab_size=500, dropout=0.5, seed=3, show_progress=False)
    tok2 = load_tokenizer_copy(tok)
    text = "made another world"
    assert [tok.encode(text, train=True) for _ in range(3)] == [tok2.encode(text, train=True) for _ in range(3)]


def load_tokenizer_copy(tok):
    from lmstack.tokenizer import Tokenizer

    return Tokenizer(tok.spec, tok.tokenizer_config())
