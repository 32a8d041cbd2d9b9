"""Reranking retrieved chunks: by a language model's likelihood of the query given the chunk, or by a
cross-encoder trained on the task.

LMReranker. For each candidate chunk c the LM reads "<c>\\n<prompt>" and we sum log p(query tokens | chunk) over the
query's tokens: a chunk that makes the question predictable (it names the same person, the same attribute)
scores high. Every candidate is scored against the same query tokens, so summed log-probabilities compare
fairly across chunks (no length normalisation needed). All candidates go through the model together, in
right-padded batches of `batch_size` (one forward for a usual top-10); a chunk longer than the model's context
is cut from its start, so the query and the end of the chunk always fit.

This is the query-likelihood model of retrieval (Ponte & Croft 1998; with an LM as in Sachan et al. 2022's
UPR), applied to the top-k of a first-stage retriever only, since it costs one LM forward per candidate.

CrossEncoderReranker. A bert-style encoder reads "[CLS] query [SEP] chunk [SEP]" (segment ids 0 then 1) and
a linear head on the [CLS] state gives one relevance logit, so query and chunk attend to each other, which a
bi-encoder's two separate vectors cannot (Nogueira & Cho 2019). rag/encoder_train.train_cross_encoder trains
one (from MiniLM) listwise: each query's positive against its BM25 hard negatives, softmax cross-entropy.
Its directory is an encoder directory plus rerank_head.safetensors and reranker.json; `load_reranker` opens it.

Usage:
    from lmstack.rag.rerank import LMReranker, load_reranker
    rr = LMReranker(model, tokenizer)                 # any lmstack causal LM and its tokenizer
    hits = rr.rerank("Where was Ada Ashford born?", index.search(q, k=20), k=5)
    hits[0].scores["rerank"]                          # the summed log-likelihood (cross-encoder: the logit)
    ce = load_reranker("runs/cross-encoder")          # written by train_cross_encoder
    index.search(q, k=5, rerank=ce)
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model
from lmstack.rag.types import Hit
from lmstack.tokenizer import load_tokenizer

HEAD_FILE = "rerank_head.safetensors"
RERANKER_FILE = "reranker.json"


def reordered(hits: list[Hit], scored: list[float], k: int | None) -> list[Hit]:
    """`hits` sorted by `scored` (kept as hit.score and hit.scores["rerank"]), the best k, ranks from 1."""
    if k is not None and k < 1:
        raise LmstackError(f"k must be >= 1, got {k}")
    order = sorted(range(len(hits)), key=lambda i: (-scored[i], i))[:k]
    return [dataclasses.replace(hits[i], score=scored[i], rank=rank, scores={**hits[i].scores,
                                "rerank": scored[i]}) for rank, i in enumerate(order, start=1)]


class LMReranker:
    """Score (query, chunk) pairs by sum log p(query | chunk) under a causal LM; see the module docstring.

    template: how a chunk and the query are laid out; "{query}" must end it (the scored span) and "{chunk}"
    must come before it."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: str = "{chunk}\nQuestion: {query}",
                 batch_size: int = 16, device: str | torch.device | None = None):
        if getattr(model.config, "head", "lm") == "none" or not getattr(model.config, "causal", True):
            raise LmstackError("LMReranker needs a causal language model with an LM head (this one is an encoder)")
        if not template.endswith("{query}") or "{chunk}" not in template.split("{query}")[0]:
            raise LmstackError(f"template {template!r} must contain '{{chunk}}' and end with '{{query}}'")
        if batch_size < 1:
            raise LmstackError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.context_len = int(model.config.max_seq_len)
        head, self.middle = template.split("{query}")[0].split("{chunk}")
        self.head = head
        bos = getattr(tokenizer, "bos_id", None)
        self.bos = [] if bos is None else [bos]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def _rows(self, query: str, chunks: list[str]) -> tuple[list[list[int]], int]:
        """Token rows (context ... query) and the number of query tokens at the end of each row."""
        q = self.tokenizer.encode(query)
        if not q:
            raise LmstackError("cannot rerank for an empty query")
        head = self.bos + self.tokenizer.encode(self.head) if self.head else list(self.bos)
        middle = self.tokenizer.encode(self.middle)
        room = self.context_len - len(head) - len(middle) - len(q)
        if room < 1:
            raise LmstackError(f"the query ({len(q)} tokens) leaves no room for a chunk in the model's context of "
                               f"{self.context_len} tokens")
        rows = []
        for text in chunks:
            body = self.tokenizer.encode(text)
            rows.append(head + body[-room:] + middle + q if body else head + middle + q)
        return rows, len(q)

    def scores(self, query: str, chunks: list[str]) -> list[float]:
        """sum log p(query | chunk) for each chunk."""
        if not chunks:
            return []
        rows, n_q = self._rows(query, chunks)
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                width = max(len(r) for r in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                for i, r in enumerate(batch):
                    ids[i, :len(r)] = torch.tensor(r)
                # right padding: with causal attention a real token never sees the pads after it
                logp = torch.log_softmax(self.model(ids.to(self.device)).float(), dim=-1)
                for i, r in enumerate(batch):
                    end = len(r)
                    targets = torch.tensor(r[end - n_q:], device=self.device)
                    # logits at position t predict token t + 1
                    picked = logp[i, end - n_q - 1:end - 1].gather(-1, targets[:, None])
                    out.append(float(picked.sum()))
        return out

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        """The hits reordered by the LM score (kept in hit.scores["rerank"] and as hit.score), the best k."""
        return reordered(hits, self.scores(query, [h.chunk.text for h in hits]), k)


class CrossEncoderReranker:
    """A bert-style encoder + a linear head on [CLS]: (query, chunk) -> a relevance logit; see the module
    docstring. `head` defaults to a new Linear(d_model, 1) (train it with train_cross_encoder)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, head: torch.nn.Linear | None = None,
                 max_length: int | None = None, batch_size: int = 32, device: str | torch.device | None = None):
        cfg = model.config
        if getattr(cfg, "head", "none") != "none" or getattr(cfg, "causal", False):
            raise LmstackError("CrossEncoderReranker needs a bidirectional encoder returning hidden states "
                               "(a bert-style model with head='none')")
        specials = tokenizer.post_processor([]) if tokenizer.post_processor is not None else []
        if len(specials) != 2:
            raise LmstackError("CrossEncoderReranker needs a tokenizer that wraps text as [CLS] ... [SEP]")
        if batch_size < 1:
            raise LmstackError(f"batch_size must be >= 1, got {batch_size}")
        self.cls_id, self.sep_id = specials
        self.max_length = min(max_length or cfg.max_seq_len, cfg.max_seq_len)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.head = (head or torch.nn.Linear(cfg.d_model, 1)).to(self.device)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def pairs(self, query: str, chunks: list[str]) -> list[tuple[list[int], int]]:
        """(token ids, length of the query segment) per chunk; the chunk is cut at its end to fit."""
        q = self.tokenizer.encode(query)[:self.max_length // 2]
        room = self.max_length - len(q) - 3
        q_part = [self.cls_id] + q + [self.sep_id]
        return [(q_part + body[:room] + [self.sep_id], len(q_part))
                for body in self.tokenizer.encode_batch([str(c) for c in chunks])]

    def logits(self, rows: list[tuple[list[int], int]]) -> torch.Tensor:
        """(len(rows),) relevance logits for pair rows from `pairs`; differentiable when grad is enabled."""
        width = max(len(r) for r, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, n_q) in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            types[i, n_q:len(r)] = 1
            mask[i, :len(r)] = 1
        hidden = self.model(ids.to(self.device), attention_mask=mask.to(self.device),
                            token_type_ids=types.to(self.device))
        return self.head(hidden[:, 0].float()).squeeze(-1)

    def scores(self, query: str, chunks: list[str]) -> list[float]:
        """The relevance logit of each chunk for `query`."""
        rows = self.pairs(query, chunks)
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                out.extend(self.logits(rows[start:start + self.batch_size]).tolist())
        return out

    def rerank(self, query: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        """The hits reordered by the cross-encoder's logit (kept in hit.scores["rerank"]), the best k."""
        return reordered(hits, self.scores(query, [h.chunk.text for h in hits]) if hits else [], k)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the encoder, tokenizer, head and reranker.json to `path` (each file atomically)."""
        path = Path(path)
        save_model(self.model, path, tokenizer=self.tokenizer)
        tmp = path / (HEAD_FILE + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp))
        os.replace(tmp, path / HEAD_FILE)
        atomic_write_text(path / RERANKER_FILE, json.dumps({"kind": "cross-encoder",
                                                            "max_length": self.max_length}, indent=2) + "\n")
        return path


def load_reranker(path: str | os.PathLike, device: str | torch.device | None = None) -> CrossEncoderReranker:
    """Open a cross-encoder directory written by CrossEncoderReranker.save / train_cross_encoder."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file() or not (path / RERANKER_FILE).is_file():
        raise LmstackError(f"{path} is not a cross-encoder directory (it needs {HEAD_FILE} and {RERANKER_FILE})")
    try:
        meta = json.loads((path / RERANKER_FILE).read_text(encoding="utf-8"))
        state = load_file(str(path / HEAD_FILE))
    except (OSError, ValueError) as e:
        raise LmstackError(f"cannot read the cross-encoder in {path}: {e}") from None
    model = load_model(path)
    head = torch.nn.Linear(model.config.d_model, 1)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise LmstackError(f"{path / HEAD_FILE} does not fit a head on d_model={model.config.d_model}: {e}") from None
    return CrossEncoderReranker(model, load_tokenizer(path), head, max_length=meta.get("max_length"), device=device)
