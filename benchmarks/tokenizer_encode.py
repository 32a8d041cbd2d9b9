"""Benchmark: encode throughput (bytes/s), our Python reference encoder and our fast path vs HF `tokenizers`.

Both tokenizers are byte-level BPE, vocab 8192, trained on the same 10 MB corpus as tokenizer_train.py
(Tiny Shakespeare + UDHR, repeated to 10 MB). Documents are ~4 KB chunks of that corpus.
- ours (python): `tok.encode` per document, our pure-Python reference encoder (word cache included),
  timed on a 2 MB slice to keep the run short;
- ours (fast path): `tok.encode_batch`, our exported tokenizer.json run by the `tokenizers` runtime;
- baseline: HF `tokenizers` `encode_batch_fast` on its own trained tokenizer.
The fast path must give the same ids as the reference; the script checks it on the slice.

Run:  python benchmarks/tokenizer_encode.py        (about 1 minute)
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402
from tokenizer_train import DATA, VOCAB, build_corpus  # noqa: E402


def docs_of(text: str, size: int = 4000) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end == -1 else end + 1
        out.append(text[start:end])
        start = end
    return out


def main() -> None:
    if not DATA.is_dir():
        print(f"skipped: shared data not found at {DATA}")
        return
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from lmstack.tokenizer import load_tokenizer, train_tokenizer
    from lmstack.tokenizer.pretokenizers import GPT4_PATTERN

    text = build_corpus()
    docs = docs_of(text)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.txt"
        path.write_text(text, encoding="utf-8")
        ours = train_tokenizer([str(path)], type="bpe", vocab_size=VOCAB, num_workers=2, show_progress=False)
        ours.save(Path(tmp) / "tok")
        ours = load_tokenizer(Path(tmp) / "tok")  # fresh caches
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.train([str(path)], trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    slice_docs = docs[: len(docs) // 5]
    slice_bytes = sum(len(d.encode("utf-8")) for d in slice_docs)
    start = time.perf_counter()
    reference = [ours.encode(d) for d in slice_docs]
    python_bps = slice_bytes / (time.perf_counter() - start)
    assert ours.encode_batch(slice_docs) == reference, "fast path and reference encoder disagree"

    ours.encode_batch(docs[:50])  # build the runtime once, outside the timing
    start = time.perf_counter()
    fast_ids = ours.encode_batch(docs)
    fast_bps = n_bytes / (time.perf_counter() - start)

    hf.encode_batch_fast(docs[:50])
    start = time.perf_counter()
    hf_ids = [e.ids for e in hf.encode_batch_fast(docs)]
    hf_bps = n_bytes / (time.perf_counter() - start)

    config = {"corpus": "Tiny Shakespeare + UDHR repeated to 10 MB, ~4 KB documents", "bytes": n_bytes,
              "documents": len(docs), "vocab_size": VOCAB, "python_slice_bytes": slice_bytes,
              "tokens_ours": sum(map(len, fast_ids)), "tokens_hf": sum(map(len, hf_ids))}
    results = [
        result("tokenizer_encode", "bytes_per_s_python_reference", True, round(python_bps), "HF tokenizers "
               "encode_batch_fast", round(hf_bps), goal=None, **config),
        result("tokenizer_encode", "bytes_per_s_fast_path", True, round(fast_bps), "HF tokenizers encode_batch_fast",
               round(hf_bps), goal=0.9, **config),
        result("tokenizer_encode", "bytes_per_token", True, round(n_bytes / config["tokens_ours"], 4),
               "HF tokenizers BpeTrainer", round(n_bytes / config["tokens_hf"], 4), goal=1.0, **config),
    ]
    write_result("tokenizer_encode", results)


if __name__ == "__main__":
    main()
