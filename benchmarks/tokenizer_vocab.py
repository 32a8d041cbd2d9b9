"""Benchmark: vocabulary operations and the re-ranking/clustering tokenizations, on real data in one run.

- II.13 pruning: a 8192-token tokenizer trained on Shakespeare + UDHR, pruned to what English Shakespeare
  uses; ids removed and embedding parameters saved, with the corpus encodings checked identical.
- II.6 / II.14 dynamic merges + expansion: a Shakespeare tokenizer learns 512 merges on HumanEval 0-81;
  bytes per token on HumanEval 82-163 before/after, and the share of held-out Shakespeare lines whose
  encoding changed (allowed only where a new merge applies: checked).
- II.11 compression-based: merge the 5% of ids whose co-occurrence-SVD embeddings cluster tightest;
  held-out per-token perplexity of a class-bigram vs token-bigram LM (the cost) and the ids saved.
- II.10 context-aware: Unigram n-best re-ranked by a bigram LM; bits/char of that LM on held-out text,
  tokens per char and encode time vs plain Viterbi.

Run:  python benchmarks/tokenizer_vocab.py        (about 1 minute)
"""
from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAME = "tokenizer_vocab"
D_MODEL = 768  # to express saved embedding parameters for a GPT-2-small-sized model


def train(texts, **kw):
    from lmstack.tokenizer import train_tokenizer

    kw.setdefault("type", "bpe")
    return train_tokenizer(texts=texts, show_progress=False, **kw)


def pruning(shakespeare: str) -> list[dict]:
    from lmstack.tokenizer.metrics import load_udhr
    from lmstack.tokenizer.vocab_ops import prune_vocab

    udhr = [r["text"] for r in load_udhr(DATA / "udhr")]
    tok = train([shakespeare] + udhr, vocab_size=8192)
    lines = shakespeare.splitlines()
    small, keep = prune_vocab(tok, lines)
    new_id = {old: new for new, old in enumerate(keep)}
    assert small.encode_batch(lines) == [[new_id[i] for i in ids] for ids in tok.encode_batch(lines)]
    return [result(NAME, "II.13_pruned_vocab_size", False, small.vocab_size, "unpruned multilingual vocab",
                   tok.vocab_size, embedding_params_saved_at_d768=(tok.vocab_size - small.vocab_size) * D_MODEL * 2,
                   corpus_encodings_identical=True, train="Shakespeare + UDHR (532 languages)",
                   prune_on="Tiny Shakespeare (English)", note="x2: untied input embedding + output layer")]


def dynamic(shakespeare: str) -> list[dict]:
    from lmstack.tokenizer.dynamic import learn_domain_merges
    from lmstack.tokenizer.metrics import bytes_per_token

    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        code = [json.loads(line) for line in f]
    code = [t["prompt"] + t["canonical_solution"] for t in code]
    base = train([shakespeare[:900_000]], vocab_size=4096)
    grown = learn_domain_merges(base, code[:82], n_merges=512)
    held = [x for x in shakespeare[900_000:].splitlines() if x.strip()]
    old = base.vocab_size
    changed = 0
    for text in held:
        before, after = base.encode(text), grown.encode(text)
        if before != after:
            assert any(i >= old for i in after)  # only where a new merge applies
            changed += 1
    return [result(NAME, "II.6_domain_merges_code_bytes_per_token", True,
                   round(bytes_per_token(grown, code[82:])["bytes_per_token"], 4), "Shakespeare-only BPE",
                   round(bytes_per_token(base, code[82:])["bytes_per_token"], 4), new_merges=512,
                   vocab=f"{old} -> {grown.vocab_size}", domain_train="HumanEval 0-81", eval="HumanEval 82-163",
                   heldout_shakespeare_lines_changed=round(changed / len(held), 4),
                   heldout_shakespeare_lines=len(held))]


def compression(shakespeare: str) -> list[dict]:
    from lmstack.tokenizer.compression import cluster_tokens, perplexity_cost

    lines = [x for x in shakespeare.splitlines() if x.strip()]
    tr, te = lines[: int(len(lines) * 0.9)], lines[int(len(lines) * 0.9):]
    tok = train(["\n".join(tr)], vocab_size=4096)
    start = time.perf_counter()
    mapping = cluster_tokens(tok, tr, n_remove=205, min_count=5)
    seconds = time.perf_counter() - start
    report = perplexity_cost(tok, tr, te, mapping)
    return [result(NAME, "II.11_cluster_merge_perplexity", False, round(report["ppl_clusters"], 3),
                   "token-bigram LM, full vocab", round(report["ppl_tokens"], 3), ids_removed=report["ids_removed"],
                   vocab_after=report["vocab_after"], ppl_cost_pct=round(100 * report["ppl_cost"], 2),
                   clustering_seconds=round(seconds, 2), embeddings="PPMI co-occurrence (window 2) + SVD, 32 dims",
                   eval="last 10% of Shakespeare lines")]


def context_aware(shakespeare: str) -> list[dict]:
    from lmstack.tokenizer.context_aware import ContextAwareEncoder

    lines = [x for x in shakespeare.splitlines() if x.strip()]
    tok = train(["\n".join(lines[:12000])], type="unigram", vocab_size=2000)
    enc = ContextAwareEncoder(tok, lines[:12000], nbest=8)
    held = "\n".join(lines[-1500:])
    start = time.perf_counter()
    base = tok.encode(held)
    t_base = time.perf_counter() - start
    tok._cache.clear()
    start = time.perf_counter()
    ids = enc.encode(held)
    t_ctx = time.perf_counter() - start
    assert tok.decode(ids) == tok.decode(base)
    return [result(NAME, "II.10_context_aware_bits_per_char", False, round(enc.bits_per_char(ids, held), 4),
                   "Viterbi unigram", round(enc.bits_per_char(base, held), 4),
                   tokens_per_char=round(len(ids) / len(held), 4),
                   viterbi_tokens_per_char=round(len(base) / len(held), 4),
                   encode_slowdown=round(t_ctx / max(t_base, 1e-9), 1), nbest=8,
                   lm="token bigram, Jelinek-Mercer 0.7, trained on Viterbi encodings of the first 12000 lines",
                   eval="last 1500 lines of Shakespeare")]


def main() -> None:
    if not DATA.is_dir():
        print(f"skipped: shared data not found at {DATA}")
        return
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    results = pruning(shakespeare) + dynamic(shakespeare) + compression(shakespeare) + context_aware(shakespeare)
    write_result(NAME, results)


if __name__ == "__main__":
    main()
