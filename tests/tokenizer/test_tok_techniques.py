"""Hybrid code/math mode, multi-vocabulary, morpheme-aware, context-aware and compression-based tokenization,
and the compression / fertility / fairness metrics."""
import math
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer

from lmstack.errors import LmstackError
from lmstack.tokenizer import train_tokenizer
from lmstack.tokenizer.compression import cluster_tokens, perplexity_cost
from lmstack.tokenizer.context_aware import ContextAwareEncoder
from lmstack.tokenizer.fairness import fairness_experiment, temperature_mix
from lmstack.tokenizer.metrics import bytes_per_token, fertility, premium_summary, write_fertility
from lmstack.tokenizer.morpheme import split_morphemes
from lmstack.tokenizer.multivocab import MultiVocabTokenizer, split_spans, train_multivocab

CODE = "\n".join(f"class Thing{i}:\n    def method(self, x):\n        if x:\n            return x * {i}\n"
                 "        return None\n" for i in range(40))


def test_hybrid_mode_digits_and_indentation(corpus, tmp_path):
    plain = train_tokenizer(texts=[corpus], type="bpe", vocab_size=600, show_progress=False)
    hybrid = train_tokenizer(texts=[corpus], type="bpe", vocab_size=600, split_digits=True, space_runs=16,
                             show_progress=False)
    number = "1234567890"
    assert len(hybrid.encode(number)) == 10  # one token per digit
    assert [hybrid.decode([i]) for i in hybrid.encode(number)] == list(number)
    for n in range(2, 17):  # every run of 2..16 spaces is a single token
        assert len(hybrid.encode(" " * n)) == 1, n
    indented = "\n".join(" " * 12 + "x = 1" for _ in range(20))
    assert len(hybrid.encode(indented)) < len(plain.encode(indented))
    hybrid.save(tmp_path)
    rust = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert rust.encode(CODE + number, add_special_tokens=False).ids == hybrid.encode(CODE + number)


def test_multivocab_routes_spans_and_roundtrips(corpus):
    prose = "\n".join(line for line in corpus.splitlines() if not any(c.isdigit() for c in line))[:20000]
    mv = train_multivocab([prose, CODE], prose_vocab=400, code_vocab=300, show_progress=False)
    assert mv.vocab_size == 700
    mixed = "The people said hello.\n    return x * 3\nAnd then they left.\n"
    kinds = [code for _, code in split_spans(mixed)]
    assert kinds == [False, True, False]
    ids = mv.encode(mixed)
    assert mv.decode(ids) == mixed
    code_ids = [i for i in ids if i >= mv.offset]
    assert code_ids and len(code_ids) < len(ids)
    with pytest.raises(LmstackError, match="token id"):
        mv.decode([mv.vocab_size])


def test_multivocab_save_load(tmp_path, corpus):
    mv = train_multivocab([corpus[:8000], CODE], prose_vocab=350, code_vocab=300, show_progress=False)
    mv.save(tmp_path / "mv")
    again = MultiVocabTokenizer.load(tmp_path / "mv")
    text = "Some words.\n    if x: return 42\n"
    assert again.encode(text) == mv.encode(text) and again.decode(mv.encode(text)) == text
    with pytest.raises(LmstackError, match="not a multi-vocabulary tokenizer"):
        MultiVocabTokenizer.load(tmp_path)


def test_morpheme_splitter_rules():
    assert split_morphemes("evlerinizden", "tr") == ["evler", "iniz", "den"]
    assert split_morphemes("özgürlüklerinden", "tr") == ["özgür", "lük", "ler", "in", "den"]
    assert split_morphemes("taloissamme", "fi") == ["talo", "issa", "mme"]
    assert split_morphemes("kirjastossa", "fi") == ["kirjasto", "ssa"]
    assert split_morphemes("talo", "fi") == ["talo"]  # stems of fewer than 3 letters are never cut
    with pytest.raises(LmstackError, match="not supported"):
        split_morphemes("word", "xx")


def test_morpheme_pretokenizer_matches_rust_runtime(tmp_path):
    fi = ("Jokaisella on oikeus vapauteen ja turvallisuuteen. Kaikki ihmiset syntyvät vapaina ja tasavertaisina "
          "arvoltaan ja oikeuksiltaan. Taloissamme ja kirjastoissanne puhutaan kielistä. ") * 8
    tr = ("Bütün insanlar hür, haysiyet ve haklar bakımından eşit doğarlar. Evlerinizden ve okullarımızdan "
          "özgürlüklerinden bahsettiler. ") * 8
    tok = train_tokenizer(texts=[fi, tr], type="bpe", vocab_size=400, morphemes="fi+tr", show_progress=False)
    plain = train_tokenizer(texts=[fi, tr], type="bpe", vocab_size=400, show_progress=False)
    assert tok.encode(" evlerinizden") != plain.encode(" evlerinizden")
    pieces = tok._head(" kirjastoissanne evlerinizden")
    assert " kirjasto" in pieces and "den" in pieces
    tok.save(tmp_path)
    rust = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    titles = "Ihmisoikeuksien yleismaailmallinen julistus; İnsan Hakları Evrensel Beyannamesi"
    for text in (fi[:400], tr[:400], titles):
        assert rust.encode(text, add_special_tokens=False).ids == tok.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_context_aware_encoding(unigram_tok, corpus):
    lines = corpus.splitlines()
    enc = ContextAwareEncoder(unigram_tok, lines[:300], nbest=6)
    held_out = "\n".join(lines[300:340])
    ids = enc.encode(held_out)
    base = unigram_tok.encode(held_out)
    assert unigram_tok.decode(ids) == unigram_tok.decode(base)
    # The re-ranker picks, word by word, the candidate the bigram LM scores highest given the previous token.
    assert enc.bits_per_char(ids, held_out) <= enc.bits_per_char(base, held_out) + 1e-9
    with pytest.raises(LmstackError, match="needs a Unigram"):
        ContextAwareEncoder(train_tokenizer(texts=[corpus[:3000]], type="bpe", vocab_size=300,
                                            show_progress=False), lines[:10])


def test_compression_by_embedding_clusters(bpe_tok, corpus):
    lines = corpus.splitlines()
    mapping = cluster_tokens(bpe_tok, lines[:450], n_remove=40, min_count=3)
    assert len(set(mapping.values())) == bpe_tok.vocab_size - 40
    assert all(mapping[i] == i for i in bpe_tok.special_ids)
    report = perplexity_cost(bpe_tok, lines[:450], lines[450:], mapping)
    assert report["ids_removed"] == 40 and report["vocab_after"] == bpe_tok.vocab_size - 40
    assert report["ppl_clusters"] > report["ppl_tokens"] > 1.0  # merging ids costs perplexity
    identity = {i: i for i in range(bpe_tok.vocab_size)}
    same = perplexity_cost(bpe_tok, lines[:450], lines[450:], identity)
    assert same["ppl_cost"] == pytest.approx(0.0, abs=1e-9)


def test_bytes_per_token_and_fertility_table(bpe_tok, tmp_path):
    stats = bytes_per_token(bpe_tok, ["the people said", "héllo"])
    assert stats["bytes"] == 21 and stats["tokens"] == len(bpe_tok.encode("the people said")) + len(
        bpe_tok.encode("héllo"))
    rows = [{"code": "eng", "name": "English", "text": "the people said that the world is good"},
            {"code": "xyz", "name": "Greek-ish", "text": "οι άνθρωποι είπαν ότι ο κόσμος είναι καλός"},
            {"code": "abc", "name": "Same", "text": "the people said that the world is good"}]
    table = fertility(bpe_tok, rows)
    assert table[0]["code"] == "xyz" and table[0]["premium"] > 2
    assert {t["code"]: t["premium"] for t in table}["abc"] == 1.0
    summary = premium_summary(table)
    assert summary["worst_language"] == "xyz" and summary["best_premium"] == 1.0
    paths = write_fertility(table, tmp_path)
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"
    assert "| 1 | xyz |" in paths["table"].read_text()
    with pytest.raises(LmstackError, match="reference language"):
        fertility(bpe_tok, rows[1:])


def _fake_language(seed: int, alphabet: str, n_words: int = 400) -> str:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(3, 7))) for _ in range(60)]
    return " ".join(rng.choice(vocab) for _ in range(n_words))


def test_temperature_sampling_lowers_worst_premium():
    big = " ".join(random.Random(1).choice(["the", "people", "said", "world", "good", "made"]) for _ in range(20000))
    train = {"eng": big, "gre": _fake_language(2, "αβγδεζηθικλμνξοπρστυφχψω"),
             "cyr": _fake_language(3, "абвгдежзийклмнопрстуфхцчшщ")}
    test = {k: v[:120] for k, v in train.items()}  # same number of characters in every language
    mix = temperature_mix(train, math.inf)
    assert abs(len(mix[0]) - len(mix[1])) < 0.05 * len(mix[0])  # uniform shares
    natural = temperature_mix(train, 1.0)
    assert len(natural[0]) > 10 * len(natural[1])
    results = fairness_experiment(train, test, [("T=1", 1.0, 400), ("T=inf", math.inf, 400)])
    assert results[1]["worst_premium"] < results[0]["worst_premium"]
    with pytest.raises(LmstackError, match="temperature"):
        temperature_mix(train, 0.0)
