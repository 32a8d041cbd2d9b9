"""WordPiece (likelihood merges, ## pieces), Unigram (EM + pruning, Viterbi, sampling) and char tokenizers."""
import random
from collections import Counter

import pytest
from tokenizers import Tokenizer as RustTokenizer

from lmstack.errors import LmstackError
from lmstack.tokenizer import load_tokenizer, train_tokenizer
from lmstack.tokenizer.unigram import Unigram
from lmstack.tokenizer.unigram_train import digamma
from lmstack.tokenizer.wordpiece_train import train_wordpiece


def _rust(tok, path):
    tok.save(path)
    return RustTokenizer.from_file(str(path / "tokenizer.json"))


# -- WordPiece ----------------------------------------------------------------------------------------------
def test_wordpiece_merges_follow_likelihood_gain():
    import math

    counts = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5, "xz": 2}
    model = train_wordpiece(counts, vocab_size=16, specials=["<|unk|>"], min_frequency=1)
    # Brute force the first merge: score = n_ab * log(n_ab * N / (n_a * n_b)), ties to the smallest ids.
    alphabet = sorted({w[0] for w in counts} | {"##" + ch for w in counts for ch in w[1:]})
    ids = {t: i + 1 for i, t in enumerate(alphabet)}
    units, pairs = Counter(), Counter()
    for w, c in counts.items():
        syms = [w[0]] + ["##" + ch for ch in w[1:]]
        for sym in syms:
            units[sym] += c
        for a, b in zip(syms, syms[1:]):
            pairs[(a, b)] += c
    total = sum(units.values())

    def score(p):
        n = pairs[p]
        return n * math.log(n * total / (units[p[0]] * units[p[1]]))

    best = min(pairs, key=lambda p: (-score(p), ids[p[0]], ids[p[1]]))
    first_new = next(t for t, i in model["vocab"].items() if i == len(alphabet) + 1)
    assert first_new == best[0] + best[1][2:]
    # Not the best plain ratio count(ab)/(count(a)count(b)), which would merge the rare 'xz' first.
    assert max(pairs, key=lambda p: pairs[p] / (units[p[0]] * units[p[1]])) == ("x", "##z") != best
    assert len(model["vocab"]) == 16 and "##s" in model["vocab"] and "h" in model["vocab"]


def test_wordpiece_parity_and_continuation_pieces(wordpiece_tok, samples, tmp_path):
    rust = _rust(wordpiece_tok, tmp_path)
    for text in samples:
        ours = wordpiece_tok.encode(text)
        assert ours == rust.encode(text, add_special_tokens=False).ids, text
        assert wordpiece_tok.decode(ours) == rust.decode(ours, skip_special_tokens=False)
    toks = [wordpiece_tok.id_to_token(i) for i in wordpiece_tok.encode("thereabouts")]
    assert toks[0] != "<|unk|>" and all(t.startswith("##") for t in toks[1:]) and len(toks) > 1
    assert wordpiece_tok.unk_id == 0 and wordpiece_tok.bos_id == 1


def test_wordpiece_unknown_character_makes_word_unk(wordpiece_tok):
    assert wordpiece_tok.encode("ᚠᛇᚻ") == [wordpiece_tok.unk_id]


# -- Unigram ------------------------------------------------------------------------------------------------
def test_digamma_matches_known_values():
    assert digamma(1.0) == pytest.approx(-0.5772156649, abs=1e-8)
    assert digamma(0.5) == pytest.approx(-1.9635100260, abs=1e-8)
    assert digamma(10.0) == pytest.approx(2.2517525891, abs=1e-8)


def test_unigram_training_and_parity(unigram_tok, samples, tmp_path):
    assert unigram_tok.vocab_size == 400
    pieces = unigram_tok.spec["model"]["vocab"]
    assert pieces[0][0] == "<|unk|>" and unigram_tok.spec["model"]["unk_id"] == 0
    learned = [s for p, s in pieces if not p.startswith("<|")]
    assert learned == sorted(learned, reverse=True) and all(s < 0 for s in learned)
    assert any(len(p) > 3 for p, _ in pieces)  # EM kept real multi-character pieces
    rust = _rust(unigram_tok, tmp_path)
    for text in samples:
        ours = unigram_tok.encode(text)
        assert ours == rust.encode(text, add_special_tokens=False).ids, text
        assert unigram_tok.decode(ours) == rust.decode(ours, skip_special_tokens=False)
    # specials sit inside the Unigram vocab but plain text can never reach them
    forged = "x<|assistant_start|>y <|bos|>"
    plain = unigram_tok.encode(forged, allow_special=False)
    assert not set(plain) & unigram_tok.special_ids
    rust.encode_special_tokens = True  # the Rust runtime agrees: its Viterbi never picks the special pieces
    assert rust.encode(forged, add_special_tokens=False).ids == plain


def test_unigram_viterbi_is_the_best_path():
    uni = Unigram([["<unk>", 0.0], ["a", -2.0], ["b", -2.0], ["ab", -3.0], ["abc", -7.5], ["c", -2.5]], unk_id=0)
    assert uni.encode_word("ab") == [3]  # -3 beats -4
    assert uni.encode_word("abc") == [3, 5]  # -5.5 beats -7.5
    best = uni.nbest("abc", 3)
    assert [round(s, 6) for s, _ in best] == [-5.5, -6.5, -7.5]
    assert uni.encode_word("abx") == [3, 0]  # unknown character -> unk


def test_unigram_sampling_only_when_training(unigram_tok):
    text = "the people would have made another world"
    base = unigram_tok.encode(text)
    assert unigram_tok.encode(text, train=True) == base  # no alpha configured
    unigram_tok.set_regularization(sample_alpha=0.2)
    try:
        assert unigram_tok.encode(text) == base
        sampled = [unigram_tok.encode(text, train=True) for _ in range(20)]
        assert any(s != base for s in sampled)
        assert all(unigram_tok.decode(s) == unigram_tok.decode(base) for s in sampled)
        # Larger alpha sharpens the distribution towards Viterbi.
        unigram_tok.set_regularization(sample_alpha=50.0)
        sharp = [unigram_tok.encode(text, train=True) for _ in range(20)]
        assert sum(s == base for s in sharp) > sum(s == base for s in sampled)
    finally:
        unigram_tok.set_regularization(sample_alpha=None)


def test_unigram_sampling_frequencies_follow_path_scores():
    uni = Unigram([["<unk>", 0.0], ["a", -1.0], ["b", -1.0], ["ab", -1.5]], unk_id=0)
    uni.sample_alpha = 1.0
    rng = random.Random(0)
    n = 4000
    whole = sum(uni.encode_word("ab", rng) == [3] for _ in range(n)) / n
    import math
    expected = math.exp(-1.5) / (math.exp(-1.5) + math.exp(-2.0))
    assert whole == pytest.approx(expected, abs=0.03)


def test_no_whitespace_assumption_mode_on_chinese_and_thai():
    # Sentences written without spaces, made of recurring words: under metaspace each line is one "word"
    # that the Unigram has to segment itself.
    rng = random.Random(0)
    zh_words = "人人 自由 尊严 权利 平等 他们 理性 良心 兄弟 关系 精神 对待 国家 社会 保护 教育".split()
    th_words = "มนุษย์ ทั้งหลาย เกิดมา มี อิสระ และ เสมอภาค กัน ใน เกียรติศักดิ์ สิทธิ ต่าง เหตุผล มโนธรรม".split()
    zh = "\n".join("".join(rng.choice(zh_words) for _ in range(8)) + "。" for _ in range(150))
    th = "\n".join("".join(rng.choice(th_words) for _ in range(8)) for _ in range(150))
    uni = train_tokenizer(texts=[zh, th], type="unigram", vocab_size=200, show_progress=False)
    wp = train_tokenizer(texts=[zh, th], type="wordpiece", vocab_size=200, show_progress=False)
    for text in (zh.split("\n")[0], th.split("\n")[0]):
        ids = uni.encode(text)
        assert uni.decode(ids) == text
        assert len(ids) < 0.6 * len(text)  # pieces span several characters of unsegmented text
        assert uni.unk_id not in ids
    # A whitespace-splitting WordPiece sees one 'word' per Thai sentence: over 100 characters it is unk.
    assert wp.encode(th.replace("\n", "")[:150]) == [wp.unk_id]


# -- char -------------------------------------------------------------------------------------------------
def test_char_tokenizer_is_nanogpt_vocab(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = train_tokenizer(texts=[text], type="char", show_progress=False)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    assert tok.vocab_size == len(chars) and tok.special_ids == set() and tok.bos_id is None
    assert tok.encode(text) == [stoi[c] for c in text]
    assert tok.decode(tok.encode(text)) == text
    rust = _rust(tok, tmp_path)
    assert rust.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert rust.decode(tok.encode(text)) == text
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode_batch([text, "hear me"]) == [tok.encode(text), tok.encode("hear me")]
    with pytest.raises(LmstackError, match="U\\+0051"):
        tok.encode("Q")
    with pytest.raises(LmstackError, match="not in the vocabulary"):
        loaded.encode_batch(["Quick"])


def test_char_tokenizer_with_specials_puts_them_first():
    tok = train_tokenizer(texts=["abcabc"], type="char", special_tokens="chat", show_progress=False)
    assert tok.bos_id == 0 and tok.token_to_id("a") == 14 and tok.vocab_size == 17



import functools  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@functools.cache
def bert_mismatches() -> frozenset[int]:
    """Code points of the BMP where our BERT normalizer + pre-tokenizer disagree with the Rust ones."""
    from tokenizers import normalizers, pre_tokenizers

    from lmstack.tokenizer.normalizers import BertNormalizer
    from lmstack.tokenizer.pretokenizers import BertPreTokenizer

    rn, rp = normalizers.BertNormalizer(lowercase=False), pre_tokenizers.BertPreTokenizer()
    pn, pp = BertNormalizer(lowercase=False), BertPreTokenizer()
    bad = set()
    for cp in [*range(0xD800), *range(0xE000, 0x10000)]:
        s = "a" + chr(cp) + "b"
        if [x for x, _ in rp.pre_tokenize_str(rn.normalize_str(s))] != pp([pn(s)]):
            bad.add(cp)
    return frozenset(bad)


def test_bert_pipeline_agrees_with_rust_on_the_bmp():
    import unicodedata

    # Only characters added in recent Unicode versions differ: Python's unicodedata (14.0) knows they are
    # punctuation or format characters, the Rust crate's older tables do not.
    assert len(bert_mismatches()) <= 40
    assert {unicodedata.category(chr(c))[0] for c in bert_mismatches()} <= {"P", "C", "S", "M"}


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0xFFFF).filter(
    lambda c: ord(c) not in bert_mismatches()), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_text, min_size=1, max_size=4))
def test_fast_path_matches_reference_for_unigram_and_wordpiece(unigram_tok, wordpiece_tok, texts):
    for tok in (unigram_tok, wordpiece_tok):
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts], tok.type


def test_unigram_byte_fallback(corpus, tmp_path):
    tok = train_tokenizer(texts=[corpus[:12000]], type="unigram", vocab_size=700, byte_fallback=True,
                          show_progress=False)
    for text in ("runic ᚠᛇᚻ here", "literal <0x41> and <|bos|> text", "🙂"):
        ids = tok.encode(text, allow_special=False)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert [tok.id_to_token(i) for i in tok.encode("ᚠ")][-3:] == ["<0xE1>", "<0x9A>", "<0xA0>"]
    rust = _rust(tok, tmp_path)
    text = "runic ᚠᛇᚻ <0x41> 🙂"
    assert rust.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert rust.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text
    with pytest.raises(LmstackError, match="byte_fallback applies to type='unigram' only"):
        train_tokenizer(texts=["abc"], type="bpe", byte_fallback=True)
