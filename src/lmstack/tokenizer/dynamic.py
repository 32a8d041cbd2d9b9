"""Dynamically learned tokenization: re-learn merges on a domain corpus on top of an existing BPE vocabulary.

A tokenizer trained on general text splits domain text (code, math, a new language) into many small
pieces. Here the domain corpus is first encoded with the current merges, then BPE training simply
continues from that segmentation (same incremental pair counts as `bpe_train.py`) and appends
`n_merges` new merges. Old merges keep their ranks, so text the new merges do not touch encodes exactly as
before, and the model only needs `n_new` fresh embedding rows (see `vocab_ops.resize_embeddings`).

Usage:
    domain_tok = learn_domain_merges(tok, code_texts, n_merges=500)
    emb, head = resize_embeddings(model.tok_emb, model.lm_head, n_new=domain_tok.vocab_size - tok.vocab_size)
"""
from __future__ import annotations

import copy

from lmstack.errors import LmstackError
from lmstack.tokenizer.bpe_train import MergeLearner
from lmstack.tokenizer.core import Tokenizer
from lmstack.tokenizer.corpus import count_words


def learn_domain_merges(tok: Tokenizer, texts: list[str], n_merges: int, min_frequency: int = 2,
                        show_progress: bool = False) -> Tokenizer:
    model = tok.spec["model"]
    if model.get("type", "BPE") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise LmstackError("learn_domain_merges needs a BPE tokenizer without subword prefixes/suffixes")
    if n_merges < 1:
        raise LmstackError(f"n_merges={n_merges} must be >= 1")
    if not any(t.strip() for t in texts):
        raise LmstackError("the domain corpus is empty")
    # Current segmentation of every unique domain word, in model ids.
    specials = [t for t in tok.added if tok.added[t].special]
    counts = count_words(texts, tok.normalizer, tok.pre_tokenizer, drop=specials)
    words, freqs = [], []
    for w, c in counts.items():
        ids = tok.model.encode_word(w)
        if len(ids) > 1:
            words.append(ids)
            freqs.append(c)
    size = tok.vocab_size
    symbols = [tok.id_to_token(i) or f"<|unused_{i}|>" for i in range(size)]  # ids may have gaps in HF files
    learner = MergeLearner(symbols, words, freqs, reserved=set(specials))
    learner.learn(size + n_merges, min_frequency, show_progress, desc="domain merges")
    spec = copy.deepcopy(tok.spec)
    spec["model"]["vocab"] = {s: i for s, i in learner.index.items() if i >= size or s in tok.model.vocab}
    spec["model"]["merges"] = [list(m) for m in tok.model.merge_list] + learner.merges
    return Tokenizer(spec, tok.config, source=f"{tok.source} (+{len(learner.merges)} domain merges)")
