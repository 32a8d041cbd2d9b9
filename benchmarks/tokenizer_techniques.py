"""Benchmark: what each tokenization technique buys, measured against plain byte-level BPE (or the obvious
baseline) on real data in one run: hybrid code/math mode, subword regularisation, morpheme-aware
pre-tokenization, multi-vocabulary, SentencePiece-style no-whitespace mode, Unigram, WordPiece, char.

Data (../shared/data): Tiny Shakespeare, GSM8K, HumanEval (tasks 0-81 train, 82-163 test), UDHR (articles
1-20 train, 21-30 test). Every figure is a ratio in the standard result shape; read `config` for what the
numbers are.

Run:  python benchmarks/tokenizer_techniques.py        (under a minute)
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAME = "tokenizer_techniques"


def load():
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        he = [json.loads(line) for line in f]
    code = [t["prompt"] + t["canonical_solution"] for t in he]
    gsm_train = [json.loads(x) for x in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    gsm_test = [json.loads(x) for x in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    return shakespeare, code[:82], code[82:], gsm_train, gsm_test


def n_tokens(tok, texts) -> int:
    return sum(map(len, tok.encode_batch(texts)))


def hybrid(train, shakespeare, code_train, code_test, gsm_train, gsm_test):
    import regex

    prose_math = [shakespeare, "\n".join(q["question"] + "\n" + q["answer"] for q in gsm_train[:3000])]
    # A tokenizer that never saw code (the usual case for a prose-heavy corpus), then one that did.
    plain0 = train(prose_math, vocab_size=4096)
    hyb0 = train(prose_math, vocab_size=4096, split_digits=True, space_runs=16)
    corpus = prose_math + code_train
    plain = train(corpus, vocab_size=4096)
    hyb = train(corpus, vocab_size=4096, split_digits=True, space_runs=16)
    math = [q["answer"] for q in gsm_test]
    numbers = regex.findall(r"\d+", "\n".join(math))
    distinct = lambda tok: len({i for n in numbers for i in tok.encode(n)})  # noqa: E731
    cfg = {"train": "Shakespeare + 3000 GSM8K train + HumanEval 0-81", "vocab_size": 4096}
    return [
        result(NAME, "II.12_hybrid_code_tokens_no_code_in_training", False, n_tokens(hyb0, code_train + code_test),
               "plain gpt4 BPE", n_tokens(plain0, code_train + code_test), eval="HumanEval 0-163 prompt+solution",
               train="Shakespeare + 3000 GSM8K train (no code)", vocab_size=4096),
        result(NAME, "II.12_hybrid_code_tokens", False, n_tokens(hyb, code_test), "plain gpt4 BPE",
               n_tokens(plain, code_test), eval="HumanEval 82-163 prompt+solution", **cfg),
        result(NAME, "II.12_hybrid_math_tokens", False, n_tokens(hyb, math), "plain gpt4 BPE",
               n_tokens(plain, math), eval="GSM8K test answers", **cfg),
        result(NAME, "II.12_hybrid_distinct_number_tokens", False, distinct(hyb), "plain gpt4 BPE",
               distinct(plain), eval=f"token ids used to spell the {len(numbers)} numbers of GSM8K test", **cfg),
    ], plain


def regularisation(train, plain, shakespeare):
    from lmstack.tokenizer import Tokenizer

    lines = [x for x in shakespeare[-200_000:].splitlines() if len(x) > 20][:2000]
    drop = Tokenizer(plain.spec, {"lmstack": {"dropout": 0.1}})
    det = n_tokens(plain, lines)
    sampled = [drop.encode(x, train=True) for x in lines]
    changed = sum(s != plain.encode(x) for s, x in zip(sampled, lines)) / len(lines)
    assert all(drop.decode(s) == x for s, x in zip(sampled, lines))
    uni = train([shakespeare[:300_000]], type="unigram", vocab_size=2000)
    uni_det = n_tokens(uni, lines)
    uni.set_regularization(sample_alpha=0.1)
    uni_s = [uni.encode(x, train=True) for x in lines]
    uni_changed = sum(s != uni.encode(x) for s, x in zip(uni_s, lines)) / len(lines)
    cfg = {"eval": "2000 Shakespeare lines", "note": "train-time encodings; inference stays deterministic"}
    return [
        result(NAME, "II.9_bpe_dropout_0.1_tokens", True, sum(map(len, sampled)), "deterministic BPE", det,
               lines_with_new_segmentation=round(changed, 3), **cfg),
        result(NAME, "II.9_unigram_alpha_0.1_tokens", True, sum(map(len, uni_s)), "Viterbi unigram", uni_det,
               lines_with_new_segmentation=round(uni_changed, 3), **cfg),
    ]


def morphemes(train):
    from lmstack.tokenizer.metrics import load_udhr

    langs = ("fin", "tur", "eng")
    tr = {r["code"]: r["text"] for r in load_udhr(DATA / "udhr", range(1, 21)) if r["code"] in langs}
    te = {r["code"]: r["text"] for r in load_udhr(DATA / "udhr", range(21, 31)) if r["code"] in langs}
    out = []
    for vocab in (500, 1000, 2000):
        plain = train(list(tr.values()), vocab_size=vocab)
        morph = train(list(tr.values()), vocab_size=vocab, morphemes="fi+tr")
        for lang in ("fin", "tur"):
            chars = len(te[lang])
            out.append(result(NAME, f"II.15_morpheme_{lang}_tokens_per_char_v{vocab}", False,
                              round(len(morph.encode(te[lang])) / chars, 4), "plain gpt4 BPE",
                              round(len(plain.encode(te[lang])) / chars, 4),
                              train="UDHR articles 1-20 of fin+tur+eng", eval="UDHR articles 21-30",
                              vocab_size=vocab))
    return out


def multivocab(train, shakespeare, code_train, code_test, gsm_train, gsm_test):
    from lmstack.tokenizer.multivocab import train_multivocab

    corpus = [shakespeare[:600_000], "\n".join(q["question"] + "\n" + q["answer"] for q in gsm_train[:2000])]
    corpus += code_train
    single = train(corpus, vocab_size=4096)
    mv = train_multivocab(corpus, prose_vocab=2048, code_vocab=2048, show_progress=False)
    test = code_test + [q["question"] + "\n" + q["answer"] for q in gsm_test[:300]] + [shakespeare[-100_000:]]
    ours = sum(len(mv.encode(t)) for t in test)
    assert all(mv.decode(mv.encode(t)) == t for t in test)
    return [result(NAME, "II.5_multivocab_tokens", False, ours, "single BPE, same total vocab",
                   n_tokens(single, test), vocab_size=4096, split="prose 2048 + code/math 2048",
                   eval="HumanEval 82-163 + 300 GSM8K test + last 100 KB of Shakespeare")]


def no_whitespace_mode(train):
    from lmstack.tokenizer.metrics import load_udhr

    langs = ("cmn_hans", "jpn", "tha")
    tr = [r["text"] for r in load_udhr(DATA / "udhr", range(1, 21)) if r["code"] in langs]
    te = [r["text"] for r in load_udhr(DATA / "udhr", range(21, 31)) if r["code"] in langs]
    uni = train(tr, type="unigram", vocab_size=2000, byte_fallback=True)
    wp = train(tr, type="wordpiece", vocab_size=2000)

    def unk_share(tok):
        ids = [i for t in te for i in tok.encode(t)]
        return sum(i == tok.unk_id for i in ids) / len(ids)

    def exact(tok):
        return sum(tok.decode(tok.encode(t)) == t for t in te) / len(te)

    chars = sum(map(len, te))
    cfg = {"train": "UDHR articles 1-20 of cmn_hans, jpn, tha", "eval": "articles 21-30", "vocab_size": 2000,
           "tokenizer": "unigram, metaspace, byte fallback"}
    # The key effect (exact round trip, no unk) is a 0-vs-something figure, so it goes in the config; the
    # ratio is on tokens per character (WordPiece's single unk per unknown word makes it look cheaper).
    cfg.update(exact_roundtrip_share_ours=exact(uni), exact_roundtrip_share_wordpiece=exact(wp),
               unk_token_share_ours=round(unk_share(uni), 4), unk_token_share_wordpiece=round(unk_share(wp), 4))
    return [result(NAME, "II.7_metaspace_tokens_per_char", False, round(n_tokens(uni, te) / chars, 4),
                   "WordPiece (whitespace + punctuation split)", round(n_tokens(wp, te) / chars, 4), **cfg)]


def model_types(train, shakespeare):
    tr, te = [shakespeare[:800_000]], [shakespeare[800_000:]]
    nbytes = len(te[0].encode("utf-8"))
    bpe = train(tr, vocab_size=2000)
    out = []
    for kind in ("unigram", "wordpiece", "char"):
        tok = train(tr, type=kind, vocab_size=2000)
        out.append(result(NAME, f"II.{ {'unigram': 2, 'wordpiece': 3, 'char': 8}[kind]}_{kind}_bytes_per_token",
                          True, round(nbytes / n_tokens(tok, te), 4), "byte-level BPE",
                          round(nbytes / n_tokens(bpe, te), 4), vocab_size=tok.vocab_size,
                          train="Shakespeare first 800 KB", eval="the remaining 315 KB"))
    return out


def main() -> None:
    if not DATA.is_dir():
        print(f"skipped: shared data not found at {DATA}")
        return
    from lmstack.tokenizer import train_tokenizer

    def train(texts, **kw):
        kw.setdefault("type", "bpe")
        return train_tokenizer(texts=texts, show_progress=False, **kw)

    shakespeare, code_train, code_test, gsm_train, gsm_test = load()
    results, plain = hybrid(train, shakespeare, code_train, code_test, gsm_train, gsm_test)
    results += regularisation(train, plain, shakespeare)
    results += morphemes(train)
    results += multivocab(train, shakespeare, code_train, code_test, gsm_train, gsm_test)
    results += no_whitespace_mode(train)
    results += model_types(train, shakespeare)
    write_result(NAME, results)


if __name__ == "__main__":
    main()
