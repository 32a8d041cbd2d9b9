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

Long-document QA (`HierarchicalQA`): the question's tokens are prepended to every chunk, so level 1 reads each
chunk in the light of the question (question-aware summaries: the chunk's pooled tokens plus the question's own
states beside that chunk, still O(n*(c+q))); level 2 compares the chunks;
heads give evidence selection (which chunk answers) and an extractive span whose start/end probabilities factor
as p(chunk) * p(token | chunk). `FlatQA` is its baseline ([question; truncated document] through one encoder),
`make_qa` the seeded task (bios of distinct entities, each stating the same relations; question = entity +
relation; answer = the value span after the relation in that entity's bio).

Usage:
    from lmstack.model.config import ModelConfig
    from lmstack.model.hierarchical import HierarchicalClassifier, make_documents
    tok = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    doc = ModelConfig(vocab_size=1, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    model = HierarchicalClassifier(tok, doc, chunk_size=16, n_classes=4)
    ids, labels = make_documents(32, n_chunks=8, chunk_size=16, n_classes=4, vocab_size=64, seed=0)
    logits = model(ids)                                   # (B, n_classes)
    logits = model(ids, attention_mask=mask)              # (B, T) 1 = real token, 0 = padding

    qa = HierarchicalQA(tok.replace(max_seq_len=18), doc, chunk_size=16, question_len=2)
    data = make_qa(32, n_chunks=8, chunk_size=16, vocab_size=64, seed=0)
    out = qa(data.questions, data.ids)                    # QAOutput: evidence (B, N), start/end (B, T) log-probs
    loss = out.loss(data.evidence, data.start, data.end)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
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


def _split_chunks(ids: torch.Tensor, attention_mask: torch.Tensor | None, chunk_size: int):
    """(B, T) -> ids (B, N, c) and mask (B, N, c) True = real; T is padded up to a multiple of chunk_size."""
    if ids.dim() != 2:
        raise LmstackError(f"input ids must have shape (batch, time), got {tuple(ids.shape)}")
    b, t = ids.shape
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != ids.shape:
        raise LmstackError(f"attention_mask shape {tuple(mask.shape)} differs from ids {tuple(ids.shape)}")
    pad = -t % chunk_size
    if pad:
        ids = torch.cat([ids, ids.new_full((b, pad), PAD_ID)], 1)
        mask = torch.cat([mask, mask.new_zeros((b, pad))], 1)
    n = ids.shape[1] // chunk_size
    return ids.view(b, n, chunk_size), mask.view(b, n, chunk_size)


def _check_question(question: torch.Tensor, ids: torch.Tensor, max_len: int) -> None:
    if question.dim() != 2 or question.shape[0] != ids.shape[0] or not 1 <= question.shape[1] <= max_len:
        raise LmstackError(f"question must have shape (batch={ids.shape[0]}, 1..{max_len} tokens), "
                           f"got {tuple(question.shape)}")


class HierarchicalEncoder(nn.Module):
    """The two levels without a head: chunk encoder -> attention pool -> document encoder over summaries.

    `question_len` > 0 makes the chunk encoder conditional: the question's tokens are prepended to every
    chunk, so each token of every chunk attends to the question (and only to its own chunk besides)."""

    def __init__(self, token_config: ModelConfig, doc_config: ModelConfig, chunk_size: int,
                 max_chunks: int | None = None, question_len: int = 0):
        super().__init__()
        if chunk_size < 1 or question_len < 0:
            raise LmstackError(f"chunk_size must be >= 1 and question_len >= 0, got {chunk_size} and {question_len}")
        self.chunk_size, self.question_len = chunk_size, question_len
        self.max_chunks = max_chunks or doc_config.max_seq_len
        self.tokens = Transformer(_encoder_config(token_config, chunk_size + question_len, "token_config"))
        # The document level runs its Blocks on vectors, so its token embedding table is never used: keep it 1 row.
        self.doc = Transformer(_encoder_config(doc_config, self.max_chunks, "doc_config").replace(vocab_size=1))
        self.chunk_pool = AttentionPool(token_config.d_model)
        d_tok, d_doc = token_config.d_model, doc_config.d_model
        self.bridge = nn.Linear(d_tok, d_doc) if d_tok != d_doc else nn.Identity()

    def chunk(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, T) -> ids (B, N, c) and mask (B, N, c); T is padded up to a multiple of chunk_size."""
        chunks, mask = _split_chunks(ids, attention_mask, self.chunk_size)
        if chunks.shape[1] > self.max_chunks:
            raise LmstackError(f"document of {ids.shape[1]} tokens makes {chunks.shape[1]} chunks of "
                               f"{self.chunk_size}, more than max_chunks={self.max_chunks}")
        return chunks, mask

    def chunk_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     question: torch.Tensor | None = None):
        """Level 1: (B, T) -> token states (B, N, c, d_token), safe mask (B*N, c), chunk present (B, N) and the
        question's states as read beside each chunk (B, N, Q, d_token), or None without a question."""
        if (question is None) != (self.question_len == 0):
            raise LmstackError("question: pass one exactly when the encoder was built with question_len > 0 "
                               f"(question_len={self.question_len})")
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
        x = chunks.reshape(b * n, c)
        q = 0
        if question is not None:
            _check_question(question, ids, self.question_len)
            q = question.shape[1]
            x = torch.cat([question.repeat_interleave(n, 0), x], 1)
        keys = None if safe is None else torch.cat([safe.new_ones(b * n, q), safe], 1)
        h = self.tokens(x, attention_mask=keys)
        hq = h[:, :q].reshape(b, n, q, -1) if q else None
        return h[:, q:].reshape(b, n, c, -1), safe, present.view(b, n), hq

    def chunk_summaries(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        question: torch.Tensor | None = None):
        """Level 1 pooled: (B, T) -> chunk summaries (B, N, d_token), chunk mask (B, N), token weights (B, N, c)."""
        h, safe, present, _ = self.chunk_states(ids, attention_mask, question)
        b, n, c, d = h.shape
        pooled, weights = self.chunk_pool(h.reshape(b * n, c, d), safe)
        return pooled.view(b, n, d), present, weights.view(b, n, c)

    def doc_states(self, summaries: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Level 2: chunk summaries (B, N, d_token) attend to each other -> (B, N, d_doc)."""
        x = self.bridge(summaries)
        doc = self.doc
        pos = torch.arange(x.shape[1], device=x.device)
        if doc.pos_emb is not None:
            x = x + doc.pos_emb(pos)
        ctx = ForwardContext(doc, pos, pos, None, None, None if bool(present.all()) else present, None)
        blocks = list(doc.blocks)
        for layer in range(doc.config.n_layers):
            x = blocks[layer % len(blocks)](x, ctx, layer)
        return doc.final_norm(x) if doc.final_norm is not None else x


class HierarchicalClassifier(HierarchicalEncoder):
    """Chunk encoder -> attention pool -> document encoder over chunk summaries -> attention pool -> head."""

    def __init__(self, token_config: ModelConfig, doc_config: ModelConfig, chunk_size: int, n_classes: int,
                 max_chunks: int | None = None):
        if n_classes < 2:
            raise LmstackError(f"n_classes must be >= 2, got {n_classes}")
        super().__init__(token_config, doc_config, chunk_size, max_chunks)
        self.n_classes = n_classes
        self.doc_pool = AttentionPool(doc_config.d_model)
        self.head = nn.Linear(doc_config.d_model, n_classes)

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> document vectors (B, d_doc)."""
        summaries, present, _ = self.chunk_summaries(ids, attention_mask)
        return self.doc_pool(self.doc_states(summaries, present), present)[0]

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


class QAOutput(NamedTuple):
    """Log-probabilities of a QA model: which chunk answers (B, N) and where the answer starts and ends (B, T)."""

    evidence: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor

    def loss(self, evidence: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """Evidence NLL + span start NLL + span end NLL (each a mean over the batch)."""
        return (F.nll_loss(self.evidence, evidence) + F.nll_loss(self.start, start) + F.nll_loss(self.end, end))


class HierarchicalQA(HierarchicalEncoder):
    """Long-document QA on the two-level encoder: evidence selection over chunks plus an extractive span.

    The question is prepended to every chunk (HierarchicalEncoder's question_len); a chunk's summary is its
    pooled tokens plus the mean of the question's states read beside it (the question tokens act as that
    chunk's [CLS]); the document level compares the summaries; a linear head scores each chunk. The span factors
    through the chunk: log p(start = token i of chunk k) = log p(chunk k) + log p(i | chunk k), where the
    within-chunk scores come from the token's state plus its chunk's document-level state."""

    def __init__(self, token_config: ModelConfig, doc_config: ModelConfig, chunk_size: int, question_len: int,
                 max_chunks: int | None = None):
        if question_len < 1:
            raise LmstackError(f"question_len must be >= 1 for QA, got {question_len}")
        super().__init__(token_config, doc_config, chunk_size, max_chunks, question_len)
        self.evidence_head = nn.Linear(doc_config.d_model, 1)
        self.lift = nn.Linear(doc_config.d_model, token_config.d_model)  # chunk context back into its tokens
        self.span_head = nn.Linear(token_config.d_model, 2)

    def forward(self, question: torch.Tensor, ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> QAOutput:
        """question (B, Q), ids (B, T) -> QAOutput: evidence (B, N), start and end (B, T) log-probs."""
        h, safe, present, hq = self.chunk_states(ids, attention_mask, question)
        b, n, c, d = h.shape
        pooled, _ = self.chunk_pool(h.reshape(b * n, c, d), safe)
        # The question's own states, having read this chunk, say how well it answers (BERT's [CLS] role):
        # without them the match must survive pooling over the chunk's filler words.
        x = self.doc_states(pooled.view(b, n, d) + hq.mean(2), present)
        evidence = torch.log_softmax(self.evidence_head(x).squeeze(-1).masked_fill(~present, float("-inf")), -1)
        local = self.span_head(h + self.lift(x).unsqueeze(2))  # (B, N, c, 2)
        if safe is not None:
            local = local.masked_fill(~safe.view(b, n, c, 1), float("-inf"))
        span = (evidence[..., None, None] + torch.log_softmax(local, 2)).reshape(b, n * c, 2)[:, :ids.shape[1]]
        return QAOutput(evidence, span[..., 0], span[..., 1])


class FlatQA(nn.Module):
    """The QA baseline: [question; first `context` document tokens] through one bidirectional encoder.

    Span scores over the tokens it sees, evidence by attention-pooling each visible chunk's token states;
    what lies past `context` gets probability zero (a fixed-context model cannot point there)."""

    def __init__(self, config: ModelConfig, chunk_size: int, question_len: int, context: int | None = None):
        super().__init__()
        self.context = context or config.max_seq_len - question_len
        if chunk_size < 1 or question_len < 1 or self.context < 1:
            raise LmstackError(f"chunk_size, question_len and context must be >= 1, got {chunk_size}, "
                               f"{question_len} and {self.context}")
        self.chunk_size, self.question_len = chunk_size, question_len
        self.encoder = Transformer(_encoder_config(config, self.context + question_len, "config"))
        self.pool = AttentionPool(config.d_model)
        self.evidence_head = nn.Linear(config.d_model, 1)
        self.span_head = nn.Linear(config.d_model, 2)

    def forward(self, question: torch.Tensor, ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> QAOutput:
        chunks, mask = _split_chunks(ids, attention_mask, self.chunk_size)  # validates shapes
        _check_question(question, ids, self.question_len)
        b, n, c = chunks.shape
        t, seen = ids.shape[1], min(ids.shape[1], self.context)
        q = question.shape[1]
        keys = mask.view(b, n * c)[:, :seen]
        all_real = bool(keys.all())
        keys = None if all_real else torch.cat([keys.new_ones(b, q), keys], 1)
        h = self.encoder(torch.cat([question, ids[:, :seen]], 1), attention_mask=keys)[:, q:]
        span = self.span_head(h).float()
        span = torch.cat([span, span.new_full((b, n * c - seen, 2), float("-inf"))], 1)
        span = span.masked_fill(~mask.view(b, n * c, 1), float("-inf"))
        span = torch.log_softmax(span[:, :t], 1)
        # Evidence: pool the states of each chunk it sees (a chunk cut by the context is pooled over its seen part).
        n_seen = -(-seen // c)
        hs = torch.cat([h, h.new_zeros(b, n_seen * c - seen, h.shape[-1])], 1).view(b * n_seen, c, -1)
        seen_mask = mask[:, :n_seen].clone()
        seen_mask.view(b, n_seen * c)[:, seen:] = False
        present = seen_mask.any(-1)
        safe = seen_mask.view(b * n_seen, c).clone()
        safe[~present.view(-1), 0] = True
        scores = self.evidence_head(self.pool(hs, safe)[0]).view(b, n_seen).float().masked_fill(~present, float("-inf"))
        scores = torch.cat([scores, scores.new_full((b, n - n_seen), float("-inf"))], 1)
        return QAOutput(torch.log_softmax(scores, -1), span[..., 0], span[..., 1])


class QAData(NamedTuple):
    questions: torch.Tensor  # (n, 2): entity id, relation id
    ids: torch.Tensor        # (n, n_chunks * chunk_size)
    evidence: torch.Tensor   # (n,) the chunk that answers
    start: torch.Tensor      # (n,) first token of the answer span in ids
    end: torch.Tensor        # (n,) last token of the answer span (inclusive)


def make_qa(n: int, n_chunks: int, chunk_size: int, vocab_size: int, n_relations: int = 3, answer_len: int = 2,
            n_entities: int | None = None, seed: int = 0, min_chunk: int = 0,
            device: str | torch.device = "cpu") -> QAData:
    """Seeded long-document QA over synthetic bios.

    Each chunk is the bio of a different entity: its first token is the entity's id, and it states every
    relation once as the relation's id followed by `answer_len` value words (drawn from the filler vocabulary,
    so a value looks like filler), in random order among filler words. The question is (entity, relation);
    the evidence is the entity's chunk (uniform in [min_chunk, n_chunks)); the answer is the value span that
    follows the relation's id there. Every chunk states the same relations, so the answer needs both the
    entity (which chunk) and the relation (which span)."""
    n_entities = n_entities or 4 * n_chunks
    body = chunk_size - 1
    if not 0 <= min_chunk < n_chunks:
        raise LmstackError(f"make_qa: min_chunk={min_chunk} must be in [0, n_chunks={n_chunks})")
    if n_entities < n_chunks:
        raise LmstackError(f"make_qa: n_entities={n_entities} < n_chunks={n_chunks}; each bio needs its own entity")
    if n_relations < 1 or answer_len < 1 or n_relations * (1 + answer_len) > body:
        raise LmstackError(f"make_qa: n_relations={n_relations} relations of answer_len={answer_len} words need "
                           f"{n_relations * (1 + answer_len)} tokens; a chunk of {chunk_size} has {body} "
                           "after its entity")
    first_word = 2 + n_entities + n_relations
    if vocab_size < first_word + 2:
        raise LmstackError(f"vocab_size {vocab_size} leaves fewer than 2 words after {first_word} reserved ids")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(first_word, vocab_size, (n, n_chunks, chunk_size), generator=g)
    evidence = torch.randint(min_chunk, n_chunks, (n,), generator=g)
    relation = torch.randint(0, n_relations, (n,), generator=g)
    questions = torch.empty(n, 2, dtype=torch.long)
    start = torch.empty(n, dtype=torch.long)
    n_fill = body - n_relations * (1 + answer_len)
    for i in range(n):
        entities = 2 + torch.randperm(n_entities, generator=g)[:n_chunks]
        ids[i, :, 0] = entities
        for j in range(n_chunks):
            # Lay out relation groups and single filler words in a random order; record where each group starts.
            pos = 1
            for item in torch.randperm(n_relations + n_fill, generator=g).tolist():
                if item < n_relations:
                    ids[i, j, pos] = 2 + n_entities + item
                    if j == int(evidence[i]) and item == int(relation[i]):
                        start[i] = j * chunk_size + pos + 1
                    pos += 1 + answer_len
                else:
                    pos += 1
        questions[i] = torch.stack([entities[evidence[i]], 2 + n_entities + relation[i]])
    return QAData(questions.to(device), ids.view(n, -1).to(device), evidence.to(device), start.to(device),
                  (start + answer_len - 1).to(device))


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
