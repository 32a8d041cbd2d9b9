"""The training loader: packs token shards into (B, T) batches, resumable to the exact next batch.

Each row holds T+1 tokens: inputs are row[:-1], targets row[1:]. Two packings:
- align_bos=True (default): every row starts at a document's first token (its BOS). Rows are
  filled best-fit from a buffer of `buffer_docs` upcoming documents: the longest one that fits the
  space left goes in whole; when none fits, the shortest is cropped to fill the row (its tail is
  dropped). So no row begins mid-document and little is cropped (nanochat's BOS-aligned best-fit).
- align_bos=False: the documents are one contiguous stream cut every T+1 tokens (nanoGPT style):
  nothing is dropped, but rows start mid-document.

With doc_ids=True each batch also carries a (B, T) LongTensor of document ids per input token, for
attention masks that do not cross documents (the model's `doc_ids` argument).

Documents are shuffled per epoch by a permutation seeded with (seed, epoch) and dealt to ranks
round-robin (rank r gets permutation[r::world_size]), so ranks see disjoint documents. The
loader's whole position is a few integers plus the best-fit buffer: `state_dict()` after batch N
and `load_state_dict()` in a fresh loader give exactly batch N+1 next.

DomainMixLoader mixes several shard sets (domains): each row's domain is drawn from a weight table
(a dict, or an AdaptiveWeights whose weights change during training, DoReMi-style), and the row is
the next row of that domain's own TokenLoader. `last_domains` names the domain of each row.

Usage:
    from lmstack.data.loader import LoaderConfig, TokenLoader
    loader = TokenLoader("out/shards", LoaderConfig(batch_size=8, seq_len=256, doc_ids=True))
    x, y, doc_ids = next(loader)              # LongTensors (8, 256)
    state = loader.state_dict()               # JSON-serialisable; save it with the checkpoint
    loader2 = TokenLoader("out/shards", LoaderConfig(...)); loader2.load_state_dict(state)
    mix = DomainMixLoader({"web": "out/web", "code": "out/code"}, LoaderConfig(batch_size=8), {"web": .7, "code": .3})
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.data.shards import ShardSet
from lmstack.errors import LmstackError


@dataclass
class LoaderConfig:
    """Batch shape, packing, order and distributed sharding of the training loader."""

    batch_size: int = 8
    """Rows per batch (per rank)."""
    seq_len: int = 256
    """T: tokens per row of inputs (each row reads T+1 tokens)."""
    align_bos: bool = True
    """Start every row at a document's BOS (best-fit packing, crops instead of splitting documents)."""
    buffer_docs: int = 64
    """Best-fit candidate pool; 1 = greedy packing in document order."""
    doc_ids: bool = False
    """Also yield (B, T) document ids for document-masked attention."""
    shuffle: bool = True
    """Shuffle documents every epoch."""
    seed: int = 0
    """Seed of the per-epoch permutation."""
    rank: int = 0
    """This process's rank."""
    world_size: int = 1
    """Number of ranks sharing the data."""
    verify: bool = False
    """Check every shard's sha256 against the manifest on open."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1 or self.buffer_docs < 1:
            raise ValueError("loader.batch_size, loader.seq_len and loader.buffer_docs must be >= 1")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"loader.rank={self.rank} must be in [0, world_size={self.world_size})")


# Fields that must match for a saved state to mean the same position.
_STATE_KEYS = ("batch_size", "seq_len", "align_bos", "buffer_docs", "shuffle", "seed", "rank", "world_size")


class TokenLoader:
    """Infinite iterator of (x, y) or (x, y, doc_ids) LongTensor batches from a shard directory."""

    def __init__(self, shards: str | Path | ShardSet, cfg: LoaderConfig | None = None) -> None:
        self.cfg = cfg or LoaderConfig()
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards, verify=self.cfg.verify)
        self.lengths = self.shards.doc_lengths()
        n = self.shards.n_docs
        if n < self.cfg.world_size:
            raise LmstackError(f"{n} documents cannot be shared by {self.cfg.world_size} ranks")
        self.epoch, self.cursor, self.batches = 0, 0, 0
        self.buffer: list[int] = []
        self.cur, self.off = -1, 0  # stream packing: current document and offset in it
        self.cropped_tokens = 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)
        if self.lengths[self._my_docs(0)].sum() == 0:
            raise LmstackError("the shards hold no tokens for this rank")

    # ---- document order ------------------------------------------------------------------------
    def _my_docs(self, epoch: int) -> np.ndarray:
        n = self.shards.n_docs
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle else np.arange(n)
        return perm[self.cfg.rank::self.cfg.world_size]

    def _next_doc(self) -> int:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._my_docs(self.epoch), self.epoch
        d = int(self._order[self.cursor])
        self.cursor += 1
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
        return d

    # ---- packing -------------------------------------------------------------------------------
    def _row_bestfit(self, C: int) -> tuple[list[np.ndarray], list[int]]:
        parts, owners, room = [], [], C
        while room > 0:
            while len(self.buffer) < self.cfg.buffer_docs:
                self.buffer.append(self._next_doc())
            lens = self.lengths[self.buffer]
            fits = lens <= room
            if fits.any():
                j = int(np.argmax(np.where(fits, lens, -1)))
                tokens = self.shards.doc(self.buffer[j])
            else:
                j = int(np.argmin(lens))
                tokens = self.shards.doc(self.buffer[j])[:room]
                self.cropped_tokens += int(lens[j]) - room
            parts.append(tokens)
            owners.append(self.buffer.pop(j))
            room -= len(tokens)
        return parts, owners

    def _row_stream(self, C: int) -> tuple[list[np.ndarray], list[int]]:
        parts, owners, room = [], [], C
        while room > 0:
            if self.cur < 0:
                self.cur, self.off = self._next_doc(), 0
            tokens = self.shards.doc(self.cur)[self.off:self.off + room]
            if len(tokens):
                parts.append(tokens)
                owners.append(self.cur)
            self.off += len(tokens)
            room -= len(tokens)
            if self.off >= self.lengths[self.cur]:
                self.cur = -1
        return parts, owners

    def __iter__(self) -> "TokenLoader":
        return self

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """One packed row of T+1 tokens and the document id of each token."""
        parts, owners = (self._row_bestfit if self.cfg.align_bos else self._row_stream)(self.cfg.seq_len + 1)
        return np.concatenate(parts), np.repeat(owners, [len(p) for p in parts])

    def __next__(self) -> tuple[torch.Tensor, ...]:
        B, T = self.cfg.batch_size, self.cfg.seq_len
        rows = np.empty((B, T + 1), dtype=np.int64)
        ids = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            rows[b], ids[b] = self.next_row()
        self.batches += 1
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if self.cfg.doc_ids:
            return x, y, torch.from_numpy(ids[:, :-1].copy())
        return x, y

    # ---- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The exact position after the last batch (plain JSON types)."""
        cfg = asdict(self.cfg)
        return {"epoch": self.epoch, "cursor": self.cursor, "buffer": list(self.buffer), "cur": self.cur,
                "off": self.off, "batches": self.batches, "cropped_tokens": self.cropped_tokens,
                "n_docs": self.shards.n_docs, "config": {k: cfg[k] for k in _STATE_KEYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a state saved with a different layout or data."""
        saved = state.get("config", {})
        cfg = asdict(self.cfg)
        diff = [k for k in _STATE_KEYS if saved.get(k) != cfg[k]]
        if diff:
            raise LmstackError(f"loader state was saved with different {', '.join(diff)} "
                               f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)})")
        if state.get("n_docs") != self.shards.n_docs:
            raise LmstackError(f"loader state is for {state.get('n_docs')} documents, the shards hold {self.shards.n_docs}")
        self.epoch, self.cursor, self.batches = int(state["epoch"]), int(state["cursor"]), int(state["batches"])
        self.buffer = [int(d) for d in state["buffer"]]
        self.cur, self.off = int(state["cur"]), int(state["off"])
        self.cropped_tokens = int(state.get("cropped_tokens", 0))


class DomainMixLoader:
    """Batches whose rows come from several domains, each row's domain drawn from `weights`.

    weights: a dict name -> weight (a fixed mix), or any object with a `.weights` dict property (read at
    every batch, so an AdaptiveWeights updated by the trainer steers the next rows). Each domain has its own
    TokenLoader (same packing, order and sharding settings), so rows never mix domains. Document ids in
    doc_ids are offset per domain so they never collide."""

    def __init__(self, domains: dict[str, str | Path | ShardSet], cfg: LoaderConfig | None = None,
                 weights: Any = None) -> None:
        if not domains:
            raise LmstackError("DomainMixLoader needs at least one domain (name -> shard directory)")
        self.cfg = cfg or LoaderConfig()
        self.names = list(domains)
        one = replace(self.cfg, batch_size=1)
        self.loaders = {k: TokenLoader(v, one) for k, v in domains.items()}
        self.weight_source = weights if weights is not None else {k: 1.0 for k in self.names}
        self._check(self._weights())
        self.offsets = dict(zip(self.names, np.cumsum([0] + [ld.shards.n_docs for ld in self.loaders.values()])))
        self.rng = np.random.default_rng([self.cfg.seed, self.cfg.rank, 7])
        self.batches = 0
        self.last_domains: list[str] = []

    def _weights(self) -> dict[str, float]:
        w = self.weight_source.weights if hasattr(self.weight_source, "weights") else self.weight_source
        return dict(w)

    def _check(self, w: dict[str, float]) -> None:
        if sorted(w) != sorted(self.names):
            raise LmstackError(f"domain weights name {sorted(w)}, the loader's domains are {sorted(self.names)}")
        if any(not v >= 0 for v in w.values()) or sum(w.values()) <= 0:
            raise LmstackError(f"domain weights must be non-negative and not all zero, got {w}")

    def __iter__(self) -> "DomainMixLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        w = self._weights()
        p = np.array([w[k] for k in self.names], dtype=np.float64)
        picks = self.rng.choice(len(self.names), size=self.cfg.batch_size, p=p / p.sum())
        B, T = self.cfg.batch_size, self.cfg.seq_len
        rows = np.empty((B, T + 1), dtype=np.int64)
        ids = np.empty((B, T + 1), dtype=np.int64)
        self.last_domains = [self.names[i] for i in picks]
        for b, name in enumerate(self.last_domains):
            rows[b], doc = self.loaders[name].next_row()
            ids[b] = doc + self.offsets[name]
        self.batches += 1
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if self.cfg.doc_ids:
            return x, y, torch.from_numpy(ids[:, :-1].copy())
        return x, y

    @property
    def cropped_tokens(self) -> int:
        return sum(ld.cropped_tokens for ld in self.loaders.values())

    def state_dict(self) -> dict[str, Any]:
        """Every domain loader's position plus the domain sampler's RNG (plain JSON types)."""
        return {"domains": {k: ld.state_dict() for k, ld in self.loaders.items()}, "batches": self.batches,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state.get("domains", {})) != sorted(self.names):
            raise LmstackError(f"loader state is for domains {sorted(state.get('domains', {}))}, "
                               f"not {sorted(self.names)}")
        for k, ld in self.loaders.items():
            ld.load_state_dict(state["domains"][k])
        self.batches = int(state["batches"])
        self.rng.bit_generator.state = state["rng"]
