"""Deduplication: exact (normalised-text hash), then near-duplicates by MinHash-LSH or SimHash.

Split in two so it parallelises: `Deduplicator.signatures(batch)` is pure and runs in worker
processes; `Deduplicator.apply(batch, sigs)` keeps the index and runs in one process, in document
order, so the first document of each cluster is the one kept. Signatures can be saved next to a
shard set and loaded again, so later additions are deduplicated against everything stored
(online expansion) without re-reading old data.

Usage:
    from lmstack.data.dedup import DedupConfig, Deduplicator, dedup_batch
    result = dedup_batch(docs, DedupConfig(near="minhash"))       # StepResult; pure
    dd = Deduplicator(DedupConfig())
    result = dd.apply(batch, dd.signatures(batch))                 # streaming, batch after batch
    dd.save("shards/dedup"); dd = Deduplicator.load("shards/dedup")
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from lmstack.config import atomic_write_text, from_dict, to_dict
from lmstack.data.dedup.exact import ExactIndex, exact_hashes
from lmstack.data.dedup.minhash import MinHashConfig, MinHasher, MinHashLSH
from lmstack.data.dedup.simhash import SimHashConfig, SimHasher, SimHashIndex
from lmstack.data.document import Doc, StepResult
from lmstack.errors import LmstackError

# name -> (signer factory, index factory); both take that method's config.
NEAR_METHODS: dict[str, tuple[Callable, Callable]] = {
    "minhash": (MinHasher, MinHashLSH),
    "simhash": (SimHasher, SimHashIndex),
}


@dataclass
class DedupConfig:
    """Which deduplication runs, and its parameters."""

    exact: bool = True
    """Drop exact copies (after normalising case, punctuation and whitespace)."""
    near: Literal["minhash", "simhash", "none"] = "minhash"
    """Near-duplicate method."""
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    """MinHash-LSH parameters (near=minhash)."""
    simhash: SimHashConfig = field(default_factory=SimHashConfig)
    """SimHash parameters (near=simhash)."""


@dataclass
class _Index:
    """One index plus the document ids it holds and the clusters it found."""

    name: str
    index: Any
    ids: list[str] = field(default_factory=list)
    members: dict[int, list[str]] = field(default_factory=dict)  # representative index -> duplicate ids

    def add(self, sigs: np.ndarray, ids: list[str]) -> np.ndarray:
        reps = self.index.add(sigs)
        self.ids.extend(ids)
        for doc_id, rep in zip(ids, reps.tolist()):
            if rep >= 0:
                self.members.setdefault(rep, []).append(doc_id)
        return reps

    def clusters(self, top: int = 5) -> dict[str, Any]:
        sizes = Counter(len(m) + 1 for m in self.members.values())
        largest = sorted(self.members.items(), key=lambda kv: -len(kv[1]))[:top]
        return {"clusters": len(self.members), "duplicates": sum(len(m) for m in self.members.values()),
                "size_histogram": {str(k): v for k, v in sorted(sizes.items())},
                "largest": [{"kept": self.ids[rep], "size": len(m) + 1, "dropped": m[:5]} for rep, m in largest]}


class Deduplicator:
    """Exact then near-duplicate removal over a stream of batches; keeps the first of each cluster."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.exact = _Index("exact", ExactIndex()) if cfg.exact else None
        self.near = None
        self.signer = None
        if cfg.near != "none":
            make_signer, make_index = NEAR_METHODS[cfg.near]
            method_cfg = getattr(cfg, cfg.near)
            self.signer = make_signer(method_cfg)
            self.near = _Index(cfg.near, make_index(method_cfg))

    def signatures(self, batch: list[Doc]) -> dict[str, np.ndarray]:
        """Pure: every signature `apply` needs for this batch (run it in worker processes)."""
        texts = [d["text"] for d in batch]
        sigs = {}
        if self.cfg.exact:
            sigs["exact"] = exact_hashes(texts)
        if self.signer is not None:
            sigs[self.cfg.near] = self.signer.signatures(texts)
        return sigs

    def apply(self, batch: list[Doc], sigs: dict[str, np.ndarray]) -> StepResult:
        """Drop documents that duplicate an earlier one (reasons 'exact_duplicate', 'near_duplicate')."""
        keep = np.ones(len(batch), dtype=bool)
        dropped: list[tuple[Doc, str]] = []
        if self.exact is not None:
            reps = self.exact.add(sigs["exact"], [d["id"] for d in batch])
            for i in np.flatnonzero(reps >= 0):
                keep[i] = False
                dropped.append((batch[i], "exact_duplicate"))
        if self.near is not None:
            live = np.flatnonzero(keep)
            reps = self.near.add(sigs[self.cfg.near][live], [batch[i]["id"] for i in live])
            for i in live[reps >= 0]:
                keep[i] = False
                dropped.append((batch[i], "near_duplicate"))
        return StepResult([d for d, k in zip(batch, keep) if k], dropped)

    def clusters(self) -> dict[str, Any]:
        """Cluster report: per index, how many clusters, their sizes, and the largest with ids."""
        return {ix.name: ix.clusters() for ix in (self.exact, self.near) if ix is not None}

    # ---- persistence (online expansion) -------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write each index's signatures (.npy) and document ids (JSON) into `path`, atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"config": to_dict(self.cfg), "indexes": {}}
        for ix in (self.exact, self.near):
            if ix is None:
                continue
            tmp = path / f".{ix.name}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, ix.index.signatures(), allow_pickle=False)
            tmp.replace(path / f"{ix.name}.npy")
            meta["indexes"][ix.name] = {"file": f"{ix.name}.npy", "ids": ix.ids}
        atomic_write_text(path / "dedup.json", json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> "Deduplicator":
        """Rebuild a Deduplicator (same config) from `save`d signatures; clusters start empty."""
        path = Path(path)
        try:
            meta = json.loads((path / "dedup.json").read_text(encoding="utf-8"))
            dd = cls(from_dict(DedupConfig, meta["config"]))
            for ix in (dd.exact, dd.near):
                if ix is None:
                    continue
                entry = meta["indexes"][ix.name]
                sigs = np.load(path / entry["file"], allow_pickle=False)
                if len(sigs) != len(entry["ids"]):
                    raise LmstackError(f"{path}/{entry['file']}: {len(sigs)} signatures but {len(entry['ids'])} ids")
                ix.index.add(sigs, query=False)
                ix.ids = list(entry["ids"])
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise LmstackError(f"cannot load stored dedup signatures from {path}: {e}") from None
        return dd


def dedup_batch(batch: list[Doc], cfg: DedupConfig | None = None) -> StepResult:
    """Deduplicate one batch on its own (a pure function: a fresh index every call)."""
    dd = Deduplicator(cfg or DedupConfig())
    return dd.apply(batch, dd.signatures(batch))
