"""Vocabulary pruning and expansion, for the tokenizer and for a model's embedding and output matrices.

Pruning drops tokens never used on a corpus. What stays: used tokens, special tokens, the base alphabet
(so any text still encodes) and, for BPE, every token a kept token is merged from. Every token created while
encoding a word is an ancestor of a final token, so the dropped merges never fired on the corpus and the
corpus encodes to exactly the same tokens (new ids = position in `keep_ids`). `resize_embeddings` then
selects the same rows of the embedding and the output layer, so logits for kept tokens are unchanged.

Expansion appends: new BPE merges get ranks after all old ones, so they only act once the old merges are
done, and text they do not touch encodes exactly as before. New embedding rows start at the mean of the
old rows (a neutral guess that keeps the output distribution close to the old one).

Usage:
    small, keep_ids = prune_vocab(tok, corpus_texts)
    emb, head = resize_embeddings(model.tok_emb, model.lm_head, keep_ids=keep_ids)
    bigger = add_tokens(tok, ["def ", "return"])              # BPE: as merges; others: added tokens
    emb, head = resize_embeddings(emb, head, n_new=bigger.vocab_size - small.vocab_size)
    resize_model_vocab(model, keep_ids=keep_ids)              # the same on an lmstack Transformer
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.vocab import real_vocab
from lmstack.tokenizer.bpe import BPE
from lmstack.tokenizer.core import Tokenizer


def token_counts(tok: Tokenizer, texts: list[str]) -> Counter:
    counts: Counter = Counter()
    for ids in tok.encode_batch(texts):
        counts.update(ids)
    return counts


def _base_ids(tok: Tokenizer) -> set[int]:
    """Tokens that keep every text encodable: single characters / bytes / byte-fallback tokens."""
    keep = set()
    for s, i in tok.model.vocab.items():
        if len(s) == 1 or (s.startswith("##") and len(s) == 3) or (len(s) == 6 and s.startswith("<0x")):
            keep.add(i)
    return keep


def _merge_closure(tok: Tokenizer, keep: set[int]) -> None:
    vocab = tok.model.vocab
    parents: dict[int, list[tuple[int, int]]] = {}
    for a, b in tok.model.merge_list:
        parents.setdefault(vocab[a + b], []).append((vocab[a], vocab[b]))
    stack = list(keep)
    while stack:
        for pa in parents.get(stack.pop(), ()):
            for p in pa:
                if p not in keep:
                    keep.add(p)
                    stack.append(p)


def _remap_spec(spec: dict, keep_ids: list[int]) -> dict:
    new_id = {old: new for new, old in enumerate(keep_ids)}
    spec = copy.deepcopy(spec)
    model = spec["model"]
    if isinstance(model["vocab"], list):  # Unigram: the list order is the id
        model["vocab"] = [model["vocab"][i] for i in keep_ids]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        model["vocab"] = {s: new_id[i] for s, i in model["vocab"].items() if i in new_id}
        if "merges" in model:
            kept = set(model["vocab"])
            model["merges"] = [list(m) for m in (x.split(" ") if isinstance(x, str) else x for x in model["merges"])
                               if m[0] in kept and m[1] in kept and m[0] + m[1] in kept]
    spec["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in spec.get("added_tokens") or [] if t["id"] in new_id]
    _remap_postprocessor(spec.get("post_processor"), new_id)
    return spec


def _remap_postprocessor(pp: dict | None, new_id: dict[int, int]) -> None:
    if not pp:
        return
    for entry in (pp.get("special_tokens") or {}).values():
        entry["ids"] = [new_id[i] for i in entry["ids"]]
    for key in ("sep", "cls"):
        if isinstance(pp.get(key), list):
            pp[key][1] = new_id[pp[key][1]]
    for sub in pp.get("processors") or []:
        _remap_postprocessor(sub, new_id)


def prune_vocab(tok: Tokenizer, texts: list[str], min_count: int = 1) -> tuple[Tokenizer, list[int]]:
    """Drop tokens used fewer than `min_count` times on `texts`. Returns (pruned tokenizer, keep_ids) where
    keep_ids[new_id] = old_id, sorted, so special tokens keep their ids."""
    if min_count < 1:
        raise LmstackError(f"min_count={min_count} must be >= 1")
    if not texts:
        raise LmstackError("prune_vocab needs a non-empty corpus to count token usage on")
    counts = token_counts(tok, texts)
    keep = {i for i, c in counts.items() if c >= min_count} | tok.special_ids | _base_ids(tok)
    if tok.unk_id is not None:
        keep.add(tok.unk_id)
    if hasattr(tok.model, "merge_list"):
        _merge_closure(tok, keep)
    keep_ids = sorted(keep)
    spec = _remap_spec(tok.spec, keep_ids)
    return Tokenizer(spec, tok.config, source=f"{tok.source} (pruned)"), keep_ids


def add_tokens(tok: Tokenizer, tokens: list[str], special: bool = False) -> Tokenizer:
    """Append tokens. For a BPE model a plain token that is one pre-token becomes a chain of new merges (so
    it also appears inside longer text, exactly as learned merges do); anything else becomes an HF added
    token matched before pre-tokenization. Ids go after the current vocabulary."""
    spec = copy.deepcopy(tok.spec)
    model = spec["model"]
    next_id = tok.vocab_size
    added = spec.setdefault("added_tokens", [])
    for t in tokens:
        if not isinstance(t, str) or not t:
            raise LmstackError(f"tokens to add must be non-empty strings, got {t!r}")
        if tok.token_to_id(t) is not None:
            continue
        pieces = tok._head(tok.normalizer(t) if tok.normalizer else t)
        if (not special and model.get("type") == "BPE" and len(pieces) == 1
                and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")):
            piece = tok._tail(pieces[0]) if tok._tail else pieces[0]
            # Encode with the merges so far, merge the first two tokens with a new (last-ranked) merge, and
            # repeat until the piece is one token; new strings get fresh ids.
            while True:
                ids = BPE(model["vocab"], model["merges"]).encode_word(piece)
                if len(ids) < 2:
                    break
                a, b = (next(s for s, i in model["vocab"].items() if i == x) for x in ids[:2])
                if a + b not in model["vocab"]:
                    model["vocab"][a + b] = next_id
                    next_id += 1
                model["merges"].append([a, b])
            continue
        added.append({"id": next_id, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": special})
        if model.get("type") == "Unigram":
            model["vocab"].append([t, 0.0])  # Unigram ids are list positions; the added token wins anyway
        elif isinstance(model["vocab"], dict):
            model["vocab"][t] = next_id
        next_id += 1
    return Tokenizer(spec, tok.config, source=f"{tok.source} (expanded)")


def _select_or_grow(weight: torch.Tensor, keep_ids: list[int] | None, n_new: int) -> torch.Tensor:
    w = weight.detach()
    if keep_ids is not None:
        if keep_ids and (min(keep_ids) < 0 or max(keep_ids) >= w.shape[0]):
            raise LmstackError(f"keep_ids must lie in [0, {w.shape[0]}), got {min(keep_ids)}..{max(keep_ids)}")
        w = w[torch.as_tensor(keep_ids, dtype=torch.long, device=w.device)]
    if n_new:
        w = torch.cat([w, w.mean(dim=0, keepdim=True).expand(n_new, *w.shape[1:])], dim=0)
    return w.clone()


def resize_embeddings(embedding: nn.Embedding, lm_head: nn.Linear | None = None, keep_ids: list[int] | None = None,
                      n_new: int = 0) -> tuple[nn.Embedding, nn.Linear | None]:
    """Prune (`keep_ids`: old ids in new order) and/or grow (`n_new` rows at the mean of the old ones) an
    embedding and its output layer. lm_head None means the output is tied to the embedding."""
    if n_new < 0:
        raise LmstackError(f"n_new={n_new} must be >= 0")
    if keep_ids is None and not n_new:
        raise LmstackError("resize_embeddings needs keep_ids (pruning) or n_new > 0 (expansion)")
    emb_w = _select_or_grow(embedding.weight, keep_ids, n_new)
    new_emb = nn.Embedding(emb_w.shape[0], emb_w.shape[1], padding_idx=None,
                           device=emb_w.device, dtype=emb_w.dtype)
    with torch.no_grad():
        new_emb.weight.copy_(emb_w)
    new_emb.weight.requires_grad_(embedding.weight.requires_grad)
    if lm_head is None:
        return new_emb, None
    head_w = _select_or_grow(lm_head.weight, keep_ids, n_new)
    new_head = nn.Linear(head_w.shape[1], head_w.shape[0], bias=lm_head.bias is not None,
                         device=head_w.device, dtype=head_w.dtype)
    with torch.no_grad():
        new_head.weight.copy_(head_w)
        if lm_head.bias is not None:
            new_head.bias.copy_(_select_or_grow(lm_head.bias.unsqueeze(1), keep_ids, n_new).squeeze(1))
    return new_emb, new_head


def _fill_padded_rows(model: nn.Module, real: int, n_new: int) -> None:
    """Turn padded rows real..real+n_new-1 into new tokens, each at the mean of the real rows."""
    with torch.no_grad():
        for w in (model.tok_emb.weight, None if model.lm_head is None else model.lm_head.weight,
                  getattr(model, "mlm_bias", None)):
            if w is not None:
                w[real:real + n_new] = w[:real].mean(dim=0)


def resize_model_vocab(model: nn.Module, keep_ids: list[int] | None = None, n_new: int = 0) -> nn.Module:
    """Apply `resize_embeddings` to an lmstack Transformer in place (tok_emb, lm_head, MLM bias, config).

    On a padded model (config.real_vocab_size < vocab_size) the tokenizer's ids end at the real rows, so a
    grown tokenizer's new ids land on padded rows: those rows become the new tokens (mean-initialised and
    unmasked), and the table only grows once the padding runs out. Pruning keeps real rows only and drops
    the padding."""
    cfg = model.config
    real = real_vocab(cfg)
    if real < cfg.vocab_size:
        if keep_ids is None and real + n_new <= cfg.vocab_size:
            if n_new < 0:
                raise LmstackError(f"n_new={n_new} must be >= 0")
            _fill_padded_rows(model, real, n_new)
            cfg.real_vocab_size = real + n_new if real + n_new < cfg.vocab_size else None
            return model
        if keep_ids is None:
            keep_ids = list(range(real))
        elif keep_ids and max(keep_ids) >= real:
            raise LmstackError(f"keep_ids must be real token ids (< real_vocab_size={real}), got {max(keep_ids)}")
        cfg.real_vocab_size = None  # what comes out has no padded rows
    model.tok_emb, model.lm_head = resize_embeddings(model.tok_emb, model.lm_head, keep_ids, n_new)
    if getattr(model, "mlm_bias", None) is not None:
        b = _select_or_grow(model.mlm_bias.unsqueeze(1), keep_ids, n_new).squeeze(1)
        model.mlm_bias = nn.Parameter(b)
    model.config.vocab_size = model.tok_emb.num_embeddings
    return model
