"""`lmstack tokenizer train|encode|stats`: train, try and measure tokenizers from the command line.

Usage:
    lmstack tokenizer train --input corpus.txt --type bpe --vocab_size 8192 --out tok/
    lmstack tokenizer train --input '[a.txt,b.txt]' --type unigram --vocab_size 4000 --out tok/
    lmstack tokenizer train --input+ a.txt --input+ b.txt --out tok/       # or a glob: --input 'data/*.txt'
    lmstack tokenizer encode --tokenizer tok/ --text "Hello world"
    lmstack tokenizer stats --tokenizer tok/ --input corpus.txt --udhr ../shared/data/udhr --out stats/

Flags use underscores (--vocab_size). Files given to --input may be globs.
"""
from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path
from typing import Literal

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.tokenizer import load_tokenizer, metrics
from lmstack.tokenizer.fairness import fairness_experiment
from lmstack.tokenizer.train import train_tokenizer


def _files(input: list[str] | str | None) -> list[str]:
    if input is None:
        return []
    items = [input] if isinstance(input, str) else list(input)
    out = []
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise LmstackError(f"--input pattern {item!r} matches no files")
            out.extend(matches)
        elif not os.path.isfile(item):
            raise LmstackError(f"--input file not found: {item}")
        else:
            out.append(item)
    return out


def train(input: list[str] | str | None = None, out: str = "tokenizer",
          type: Literal["bpe", "wordpiece", "unigram", "char"] = "bpe", vocab_size: int = 8192,
          pretokenizer: Literal["default", "gpt4", "gpt2", "metaspace", "bert", "none"] = "default",
          split_digits: bool = False, space_runs: int = 0, morphemes: Literal["none", "fi", "tr", "fi+tr"] = "none",
          special_tokens: Literal["default", "chat", "none"] = "default", min_frequency: int = 2,
          lowercase: bool = False, dropout: float = 0.0, sample_alpha: float | None = None,
          invalid_utf8: Literal["error", "skip"] = "error", num_workers: int = 1) -> dict:
    """Train a tokenizer on text files and save tokenizer.json + tokenizer_config.json to --out.

    Args:
        input: training files (globs allowed); several: --input '[a.txt,b.txt]' or repeat --input+ FILE.
        out: output directory.
        type: bpe (byte-level), wordpiece (BERT), unigram (SentencePiece style) or char (nanoGPT).
        vocab_size: total vocabulary size including special tokens.
        pretokenizer: gpt4, gpt2, metaspace (no whitespace assumption), bert, none; default picks per type.
        split_digits: hybrid code/math mode: one token per digit.
        space_runs: hybrid code/math mode: single tokens for runs of up to this many spaces (0 = off).
        morphemes: split Finnish/Turkish suffixes before BPE (none, fi, tr, fi+tr).
        special_tokens: chat (bos/eos/pad/mask + chat roles + tool tokens), none, or default.
        min_frequency: minimum pair count for a merge.
        lowercase: WordPiece only: lowercase and strip accents.
        dropout: BPE-dropout probability for training-time encoding.
        sample_alpha: Unigram sampling smoothing for training-time encoding.
        invalid_utf8: error (stop, naming file and byte offset) or skip (drop bad lines and count them).
        num_workers: processes for word counting.
    """
    files = _files(input)
    if not files:
        raise LmstackError("tokenizer train needs --input FILE (or several: --input '[a.txt,b.txt]')")

    tok = train_tokenizer(files, type=type, vocab_size=vocab_size, pretokenizer=pretokenizer,
                          split_digits=split_digits, space_runs=space_runs, morphemes=morphemes,
                          special_tokens=special_tokens, min_frequency=min_frequency, lowercase=lowercase,
                          dropout=dropout, sample_alpha=sample_alpha, invalid_utf8=invalid_utf8,
                          num_workers=num_workers)
    tok.save(out)
    stats = tok.config["lmstack"]["training"]
    summary = {"out": str(out), "type": tok.type, "vocab_size": tok.vocab_size, **stats}
    if stats.get("skipped_lines"):
        print(f"skipped {stats['skipped_lines']} lines with invalid UTF-8")
    print(json.dumps(summary))
    return summary


def encode(tokenizer: str = "tokenizer", text: str = "", add_special_tokens: bool = False,
           show_tokens: bool = True) -> list[int]:
    """Encode --text with a saved tokenizer and print the ids (and the tokens).

    Args:
        tokenizer: directory holding tokenizer.json, or the file itself.
        text: the text to encode.
        add_special_tokens: run the post-processor (e.g. prepend <|bos|>).
        show_tokens: also print each token string.
    """

    tok = load_tokenizer(tokenizer)
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    print(json.dumps(ids))
    if show_tokens:
        print(json.dumps([tok.id_to_token(i) for i in ids], ensure_ascii=False))
    print(f"{len(ids)} tokens, {len(text.encode('utf-8')) / max(1, len(ids)):.2f} bytes/token")
    return ids


FAIRNESS_LANGS = ("eng", "fra", "spa", "rus", "ukr", "arb", "heb", "hin", "ben", "tam", "cmn_hans", "jpn", "kor",
                  "tha", "vie", "fin", "tur", "swh", "amh", "yor")


def stats(tokenizer: str = "tokenizer", input: list[str] | str | None = None, udhr: str | None = None,
          out: str | None = None, top: int = 25, fairness: bool = False) -> dict:
    """Measure a tokenizer: bytes per token on --input, and UDHR fertility and premium per language.

    Args:
        tokenizer: directory holding tokenizer.json, or the file itself.
        input: text files for bytes/token (globs allowed); with --fairness, the dominant-language corpus.
        udhr: the UDHR folder (e.g. ../shared/data/udhr) for fertility per language.
        out: directory for fertility.md and fertility.png (default: <tokenizer>/stats).
        top: how many worst and best languages the chart shows.
        fairness: also retrain at several corpus temperatures and vocab sizes and report the worst premium.
    """

    tok = load_tokenizer(tokenizer)
    result: dict = {"tokenizer": str(tokenizer), "vocab_size": tok.vocab_size}
    files = _files(input)
    if files:
        texts = [Path(f).read_text(encoding="utf-8") for f in files]
        result["compression"] = metrics.bytes_per_token(tok, texts)
        print(f"compression: {result['compression']['bytes_per_token']:.3f} bytes/token "
              f"({result['compression']['tokens']} tokens for {result['compression']['bytes']} bytes)")
    if udhr:
        table = metrics.fertility(tok, metrics.load_udhr(udhr))
        tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
        out_dir = Path(out) if out else tok_dir / "stats"
        paths = metrics.write_fertility(table, out_dir, top=top)
        result["udhr"] = metrics.premium_summary(table)
        result["files"] = {k: str(v) for k, v in paths.items()}
        print(f"{'code':<10} {'tokens/char':>11} {'premium':>8}")
        for t in table[:10] + [None] + table[-5:]:
            print("..." if t is None else f"{t['code']:<10} {t['tokens_per_char']:>11.3f} {t['premium']:>8.2f}")
        print(f"worst premium {result['udhr']['worst_premium']:.2f} ({result['udhr']['worst_language']}), "
              f"median {result['udhr']['median_premium']:.2f}; table and chart in {out_dir}")
    if fairness:
        result["fairness"] = _fairness(tok, files, udhr)
    if not files and not udhr:
        raise LmstackError("tokenizer stats needs --input FILES and/or --udhr DIR")
    if out or udhr:
        tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
        out_dir = Path(out) if out else tok_dir / "stats"
        atomic_write_text(out_dir / "stats.json", json.dumps(result, indent=2, default=str) + "\n")
    return result


def _fairness(tok, files: list[str], udhr: str | None) -> list[dict]:
    if not udhr or not files:
        raise LmstackError("--fairness needs --udhr DIR and --input FILES (the dominant-language corpus)")
    train_rows = {r["code"]: r["text"] for r in metrics.load_udhr(udhr, range(1, 21)) if r["code"] in FAIRNESS_LANGS}
    test_rows = {r["code"]: r["text"] for r in metrics.load_udhr(udhr, range(21, 31)) if r["code"] in FAIRNESS_LANGS}
    # The --input corpus plays a large English web crawl; the UDHR articles 1-20 are the small languages.
    train_rows["eng"] = "\n".join(Path(f).read_text(encoding="utf-8") for f in files) + "\n" + train_rows.get("eng", "")
    v = tok.vocab_size
    settings = [("natural mix (T=1)", 1.0, v), ("T=3", 3.0, v), ("uniform (T=inf)", math.inf, v),
                ("natural mix, 2x vocab", 1.0, 2 * v)]
    results = fairness_experiment(train_rows, test_rows, settings)
    for r in results:
        print(f"{r['setting']:<24} vocab {r['vocab_size']:>6}  worst premium {r['worst_premium']:.2f} "
              f"({r['worst_language']})  mean {r['mean_premium']:.2f}")
    return [{k: v for k, v in r.items() if k != "premium"} for r in results]


COMMANDS = {"train": train, "encode": encode, "stats": stats}
