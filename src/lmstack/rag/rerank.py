"""Reranking retrieved chunks by a language model's likelihood of the query given the chunk.

For each candidate chunk c the LM reads "<c>\\n<prompt>" and we sum log p(query tokens | chunk) over the
query's tokens: a chunk that makes the question predictable (it names the same person, the same attribute)
scores high. Every candidate is scored against the same query tokens, so summed log-probabilities compare
fairly across chunks (no length normalisation needed). All candidates go through the model together, in
right-padded batches of `batch_size` (one forward for a usual top-10); a chunk longer than the model's context
is cut from its start, so the query and the end of the chunk always fit.

This is the query-likelihood model of retrieval (Ponte & Croft 1998; with an LM as in Sachan et al. 2022's
UPR), applied to the top-k of a first-stage retriever only, since it costs one LM forward per candidate.

Usage:
    from lmstack.rag.rerank import LMReranker
    rr = LMReranker(model, tokenizer)                 # any lmstack causal LM and its tokenizer
    hits = rr.rerank("Where was Ada Ashford born?", index.search(q, k=20), k=5)
    hits[0].scores["rerank"]                          # the summed log-likelihood
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lmstack.errors import LmstackError
from lmstack.rag.types import Hit


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
        if k is not None and k < 1:
            raise LmstackError(f"k must be >= 1, got {k}")
        scored = self.scores(query, [h.chunk.text for h in hits])
        order = sorted(range(len(hits)), key=lambda i: (-scored[i], i))[:k]
        return [dataclasses.replace(hits[i], score=scored[i], rank=rank, scores={**hits[i].scores,
                                    "rerank": scored[i]}) for rank, i in enumerate(order, start=1)]
