"""Hierarchical attention for long documents (HAN, Yang et al. 2016, with Transformer layers; issue 22 XI.7).

Two levels. Level 1: the document is cut into fixed-size chunks and each chunk runs on its own through a
bidirectional Transformer (the project's Transformer, `causal=False, head='none'`), so a token sees only the
tokens of its chunk. Each chunk is then pooled to one summary vector by attention pooling (HAN's
u^T tanh(W h) scores). Level 2: the chunk summaries run through a second small bidirectional encoder (the
project's Blocks over vectors instead of token ids), are pooled again to one document vector, and a linear
head classifies the document. Attention cost is O(n*c + (n/c)^2) for n tokens and chunks of c, not O(n^2).

Chunks are a reshape (B, N*c) -> (B*N, c), not a block-diagonal mask over the whole row: the per-chunk
batch never builds an n x n score matrix, which is the point of the method.

`FlatClassifier` is the baseline: one bidirectional encoder over the (truncated) sequence, the same attention
pooling and head. `make_documents` generates the benchmark's task from a seed.

Usage:
    from lmstack.model.config import ModelConfig
    from lmstack.model.hierarchical import HierarchicalClassifier, make_documents
    tok = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    doc = ModelConfig(vocab_size=1, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    model = HierarchicalClassifier(tok, doc, chunk_size=16, n_classes=4)
    ids, labels = make_documents(32, n_chunks=8, chunk_size=16, n_classes=4, vocab_size=64, seed=0)
    logits = model(ids)                                   # (B, n_classes)
    logits = model(ids, attention_mask=mask)              # (B, T) 1 = real token, 0 = padding
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.transformer import ForwardContext, Transformer

# Token ids the generator reserves: 0 is padding, 1 marks the chunk that describes the document's subject.
PAD_ID, SUBJECT_ID = 0, 1


class AttentionPool(nn.Module):
    """HAN's attention pooling: score_i = u^T tanh(W h_i), softmax over the (unmasked) items, weighted sum."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.query = nn.Parameter(torch.randn(d) / d ** 0.5)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (..., L, d), mask (..., L) True = real -> pooled (..., d) and weights (..., L)."""
        scores = torch.tanh(self.proj(h)) @ self.query
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(h.dtype)
        return (weights.unsqueeze(-1) * h).sum(-2), weights


def _encoder_config(cfg: ModelConfig, length: int, what: str) -> ModelConfig:
    if cfg.max_seq_len < length and cfg.position == "learned":
        raise LmstackError(f"{what}: max_seq_len={cfg.max_seq_len} is shorter than its inputs ({length}) "
                           "and learned positions cannot extend")
    return cfg.replace(causal=False, head="none")


class HierarchicalClassifier(nn.Module):
    """Chunk encoder -> attention pool -> document encoder over chunk summaries -> attention pool -> head."""

    def __init__(self, token_config: ModelConfig, doc_config: ModelConfig, chunk_size: int, n_classes: int,
                 max_chunks: int | None = None):
        super().__init__()
        if chunk_size < 1 or n_classes < 2:
            raise LmstackError(f"chunk_size must be >= 1 and n_classes >= 2, got {chunk_size} and {n_classes}")
        self.chunk_size, self.n_classes = chunk_size, n_classes
        self.max_chunks = max_chunks or doc_config.max_seq_len
        self.tokens = Transformer(_encoder_config(token_config, chunk_size, "token_config"))
        # The document level runs its Blocks on vectors, so its token embedding table is never used: keep it 1 row.
        self.doc = Transformer(_encoder_config(doc_config, self.max_chunks, "doc_config").replace(vocab_size=1))
        d_tok, d_doc = token_config.d_model, doc_config.d_model
        self.chunk_pool = AttentionPool(d_tok)
        self.bridge = nn.Linear(d_tok, d_doc) if d_tok != d_doc else nn.Identity()
        self.doc_pool = AttentionPool(d_doc)
        self.head = nn.Linear(d_doc, n_classes)

    def chunk(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, T) -> ids (B, N, c) and mask (B, N, c); T is padded up to a multiple of chunk_size."""
        if ids.dim() != 2:
            raise LmstackError(f"input ids must have shape (batch, time), got {tuple(ids.shape)}")
        b, t = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != ids.shape:
            raise LmstackError(f"attention_mask shape {tuple(mask.shape)} differs from ids {tuple(ids.shape)}")
        pad = -t % self.chunk_size
        if pad:
            ids = torch.cat([ids, ids.new_full((b, pad), PAD_ID)], 1)
            mask = torch.cat([mask, mask.new_zeros((b, pad))], 1)
        n = ids.shape[1] // self.chunk_size
        if n > self.max_chunks:
            raise LmstackError(f"document of {t} tokens makes {n} chunks of {self.chunk_size}, "
                               f"more than max_chunks={self.max_chunks}")
        return ids.view(b, n, self.chunk_size), mask.view(b, n, self.chunk_size)

    def chunk_summaries(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Level 1: (B, T) -> chunk summaries (B, N, d_token), chunk mask (B, N), token weights (B, N, c)."""
        chunks, mask = self.chunk(ids, attention_mask)
        b, n, c = chunks.shape
        flat_mask = mask.reshape(b * n, c)
        present = flat_mask.any(-1)
        # An all-padding chunk would give a row of -inf scores (NaN); let it see its first key, then drop it.
        # No mask at all when nothing is padded, so attention keeps its unmasked fast kernel.
        safe = None
        if not bool(flat_mask.all()):
            safe = flat_mask.clone()
            safe[~present, 0] = True
        h = self.tokens(chunks.reshape(b * n, c), attention_mask=safe)
        pooled, weights = self.chunk_pool(h, safe)
        return pooled.view(b, n, -1), present.view(b, n), weights.view(b, n, c)

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> document vectors (B, d_doc)."""
        summaries, present, _ = self.chunk_summaries(ids, attention_mask)
        x = self.bridge(summaries)
        doc = self.doc
        pos = torch.arange(x.shape[1], device=x.device)
        if doc.pos_emb is not None:
            x = x + doc.pos_emb(pos)
        ctx = ForwardContext(doc, pos, pos, None, None, None if bool(present.all()) else present, None)
        blocks = list(doc.blocks)
        for layer in range(doc.config.n_layers):
            x = blocks[layer % len(blocks)](x, ctx, layer)
        if doc.final_norm is not None:
            x = doc.final_norm(x)
        pooled, _ = self.doc_pool(x, present)
        return pooled

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, n_classes) logits."""
        return self.head(self.encode(ids, attention_mask))


class FlatClassifier(nn.Module):
    """The baseline: one bidirectional encoder over the first `context` tokens, attention pooling, a head."""

    def __init__(self, config: ModelConfig, n_classes: int, context: int | None = None):
        super().__init__()
        self.context = context or config.max_seq_len
        self.encoder = Transformer(_encoder_config(config, self.context, "config"))
        self.pool = AttentionPool(config.d_model)
        self.head = nn.Linear(config.d_model, n_classes)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = ids[:, :self.context]  # truncation: what a fixed-context model does with a longer document
        mask = None if attention_mask is None else attention_mask[:, :self.context].bool()
        h = self.encoder(ids, attention_mask=mask)
        return self.head(self.pool(h, mask)[0])


def make_documents(n: int, n_chunks: int, chunk_size: int, n_classes: int, vocab_size: int, seed: int = 0,
                   topic_words: int = 4, distractors: int = 2, min_chunk: int = 0,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded long-document topic classification: ids (n, n_chunks*chunk_size) and labels (n,).

    Each chunk is a "bio" of filler words. One chunk (placed uniformly in [min_chunk, n_chunks)) is the
    subject's: it starts with SUBJECT_ID and holds topic words of the label's class. `distractors` other
    chunks hold topic words of other classes without the marker, so the label is a property of the one
    marked chunk: a model must tie the marker to the words beside it, not count topic words."""
    if not 0 <= min_chunk < n_chunks or chunk_size < topic_words + 1 or distractors >= n_chunks:
        raise LmstackError(f"make_documents: need 0 <= min_chunk < n_chunks, chunk_size > topic_words and "
                           f"distractors < n_chunks (got {min_chunk}, {n_chunks}, {chunk_size}, {topic_words}, "
                           f"{distractors})")
    first_filler = 2 + n_classes * topic_words
    if vocab_size <= first_filler + 1:
        raise LmstackError(f"vocab_size {vocab_size} leaves no filler words after {first_filler} reserved ids")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(first_filler, vocab_size, (n, n_chunks, chunk_size), generator=g)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    subject = torch.randint(min_chunk, n_chunks, (n,), generator=g)
    for i in range(n):
        order = torch.randperm(n_chunks, generator=g).tolist()
        others = [j for j in order if j != int(subject[i])][:distractors]
        for j, cls in [(int(subject[i]), int(labels[i]))] + [
                (j, (int(labels[i]) + 1 + int(torch.randint(0, n_classes - 1, (1,), generator=g))) % n_classes)
                for j in others]:
            slots = torch.randperm(chunk_size - 1, generator=g)[:topic_words] + 1
            ids[i, j, slots] = 2 + cls * topic_words + torch.randint(0, topic_words, (topic_words,), generator=g)
        ids[i, int(subject[i]), 0] = SUBJECT_ID
    return ids.view(n, n_chunks * chunk_size).to(device), labels.to(device)
