"""Benchmark: byte-level BPE training time and compression, lmstack vs HF `tokenizers` (Rust), same corpus.

Corpus: Tiny Shakespeare + every UDHR translation (articles), repeated from the start until it reaches
10,000,000 bytes (~1.3 copies: the real data is 7.9 MB). Both sides: GPT-4 split regex + byte-level, all 256
bytes in the base alphabet, vocab 8192, min pair frequency 2, both CPU cores (HF: rayon; ours: 2 counting
processes, the merge loop is single-threaded Python).

Also: WordPiece and Unigram training vs HF's trainers on Tiny Shakespeare (1.1 MB), vocab 4096. Both sides train on
the same text: HF's UnigramTrainer gets the whole file as one string, newlines included. (An earlier version gave
HF `text.splitlines()`, so its vocabulary had no newline and it wrote <unk> for every line break; that setting is
kept in the JSON config as `hf_trained_on_lines` with its <unk> count, for the record.) The <unk> counts of both
encodings of the corpus are reported.

Run:  python benchmarks/tokenizer_train.py                  (a few minutes on 2 shared cores)
      python benchmarks/tokenizer_train.py --unigram-only     (reruns the Unigram rows, keeps the others)
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET_BYTES = 10_000_000
VOCAB = 8192


def build_corpus() -> str:
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    with gzip.open(DATA / "udhr" / "udhr_full.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    udhr = "\n\n".join("\n".join(a["text"] for a in r["articles"]) for r in rows)
    base = shakespeare + "\n\n" + udhr
    text = base
    while len(text.encode("utf-8")) < TARGET_BYTES:
        text += "\n\n" + base
    return text.encode("utf-8")[:TARGET_BYTES].decode("utf-8", errors="ignore")


def main() -> None:
    if not DATA.is_dir():
        print(f"skipped: shared data not found at {DATA}")
        return
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from lmstack.tokenizer import train_tokenizer
    from lmstack.tokenizer.pretokenizers import GPT4_PATTERN

    text = build_corpus()
    n_bytes = len(text.encode("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.txt"
        path.write_text(text, encoding="utf-8")

        start = time.perf_counter()
        ours = train_tokenizer([str(path)], type="bpe", vocab_size=VOCAB, num_workers=2, show_progress=False)
        ours_s = time.perf_counter() - start

        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        start = time.perf_counter()
        hf.train([str(path)], trainer)
        hf_s = time.perf_counter() - start

    # Compression on held-out text: the Shakespeare tail and UDHR are both in the corpus, so also report on
    # GSM8K questions, which neither tokenizer saw.
    held_out = [json.loads(line)["question"] for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    train_sample = [text[i:i + 2000] for i in range(0, len(text), 200_000)]

    def bpt(encode_batch, texts):
        return sum(len(t.encode("utf-8")) for t in texts) / sum(map(len, encode_batch(texts)))

    hf_batch = lambda texts: [e.ids for e in hf.encode_batch(texts)]  # noqa: E731
    config = {"corpus": "Tiny Shakespeare + UDHR (532 languages), repeated to 10 MB", "bytes": n_bytes,
              "vocab_size": VOCAB, "pretokenizer": "gpt4 regex + byte-level", "min_frequency": 2,
              "cores": os.cpu_count(), "ours_workers": 2}
    results = [
        result("tokenizer_train", "train_seconds", False, round(ours_s, 2), "HF tokenizers BpeTrainer",
               round(hf_s, 2), goal=1 / 3, **config),
        result("tokenizer_train", "bytes_per_token_corpus", True, round(bpt(ours.encode_batch, train_sample), 4),
               "HF tokenizers BpeTrainer", round(bpt(hf_batch, train_sample), 4), goal=1.0, **config),
        result("tokenizer_train", "bytes_per_token_gsm8k_heldout", True,
               round(bpt(ours.encode_batch, held_out), 4), "HF tokenizers BpeTrainer",
               round(bpt(hf_batch, held_out), 4), goal=1.0, **config),
    ]
    results += other_trainers()
    write_result("tokenizer_train", results)


def _unk_count(ids: list[int], unk: int | None) -> int:
    return 0 if unk is None else sum(1 for i in ids if i == unk)


def other_trainers(kinds: tuple[str, ...] = ("wordpiece", "unigram")) -> list[dict]:
    """WordPiece and Unigram training time and compression vs HF's trainers, on Tiny Shakespeare (1.1 MB)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from lmstack.tokenizer import train_tokenizer

    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    out = []
    for kind in kinds:
        start = time.perf_counter()
        ours = train_tokenizer(texts=[text], type=kind, vocab_size=4096, show_progress=False)
        ours_s = time.perf_counter() - start
        if kind == "wordpiece":
            hf = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            hf.normalizer = normalizers.BertNormalizer(lowercase=False)
            hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            trainer = trainers.WordPieceTrainer(vocab_size=4096, special_tokens=["[UNK]"], show_progress=False)
        else:
            hf = Tokenizer(models.Unigram())
            hf.pre_tokenizer = pre_tokenizers.Metaspace()
            trainer = trainers.UnigramTrainer(vocab_size=4096, special_tokens=["<unk>"], unk_token="<unk>",
                                              show_progress=False)
        start = time.perf_counter()
        # WordPiece's BERT pre-tokenizer drops whitespace, so lines are the same text; Unigram's Metaspace keeps
        # newlines, so it must see the whole file, as ours does.
        hf.train_from_iterator(text.splitlines() if kind == "wordpiece" else [text], trainer)
        hf_s = time.perf_counter() - start
        cfg = {"corpus": "Tiny Shakespeare (1.1 MB)", "vocab_size": 4096, "type": kind,
               "hf_trainer": type(trainer).__name__, "hf_input": "lines" if kind == "wordpiece" else "whole text",
               "machine": "2 cores, shared", "repeats": 1}
        if kind == "unigram":
            ours_ids, hf_ids = ours.encode_batch([text])[0], hf.encode(text).ids
            cfg["unk_tokens_ours"] = _unk_count(ours_ids, ours.unk_id)
            cfg["unk_tokens_hf"] = _unk_count(hf_ids, hf.token_to_id("<unk>"))
            lines = Tokenizer(models.Unigram())
            lines.pre_tokenizer = pre_tokenizers.Metaspace()
            lines.train_from_iterator(text.splitlines(), trainers.UnigramTrainer(
                vocab_size=4096, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False))
            line_ids = lines.encode(text).ids
            cfg["hf_trained_on_lines"] = {"bytes_per_token": round(n_bytes / len(line_ids), 4),
                                          "unk_tokens": _unk_count(line_ids, lines.token_to_id("<unk>"))}
        out.append(result("tokenizer_train", f"{kind}_train_seconds", False, round(ours_s, 2),
                          f"HF tokenizers {type(trainer).__name__}", round(hf_s, 2), goal=None, **cfg))
        out.append(result("tokenizer_train", f"{kind}_bytes_per_token_corpus", True,
                          round(n_bytes / len(ours.encode_batch([text])[0]), 4),
                          f"HF tokenizers {type(trainer).__name__}", round(n_bytes / len(hf.encode(text).ids), 4),
                          goal=None, **cfg))
    return out


if __name__ == "__main__":
    if "--unigram-only" in sys.argv:
        previous = json.loads((Path(__file__).resolve().parent / "results" / "tokenizer_train.json").read_text())
        write_result("tokenizer_train", [r for r in previous if not r["metric"].startswith("unigram_")]
                     + other_trainers(("unigram",)))
    else:
        main()
