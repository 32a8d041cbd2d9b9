"""Token shards: documents -> tokenized binary shards with a document index, a manifest, resume.

Layout of a shard set directory:
    manifest.json              dtype, tokenizer, totals, and one entry per shard with token/doc
                               counts and sha256 checksums of its files and of its input
    shard_00000.bin            token ids, raw little-endian uint16 (vocab <= 65536) or uint32;
                               memory-mapped by the loader. With zstd: shard_00000.bin.zst
    shard_00000.idx.npy        int64 offsets of each document's first token, plus the total (n_docs + 1)

Each document is stored as [BOS] + tokens (+ [EOS] if add_eos). Shards close after
`docs_per_shard` documents or `chars_per_shard` characters, which depends only on the input, so
the plan of shards is known before tokenizing and a rerun can skip work.

Safety: every file is written to a temporary name and renamed; the manifest is rewritten
(atomically) after each finished shard and is the only thing that makes a shard valid. A killed
run leaves at most temp files (deleted on the next run) or a renamed shard the manifest does not
list (rewritten). A rerun skips shards whose manifest entry matches both the input (sha256 of the
documents) and the files on disk (sha256), and tokenizes the rest, with `workers` processes that
each load the tokenizer from its spec (never a pickle).

Usage:
    from lmstack.data.shards import ShardConfig, write_shards, ShardSet
    manifest = write_shards(docs, "out/shards", ShardConfig(tokenizer="bytes"), workers=2)
    shards = ShardSet("out/shards")
    shards.doc(0)          # numpy array of the first document's tokens
"""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
import io
import json
import os
from pathlib import Path
import tempfile
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
from tqdm import tqdm
import zstandard

from lmstack.config import atomic_write_text
from lmstack.data.document import Doc
from lmstack.data.parallel import parallel_map
from lmstack.data.shard_tokenizer import load_shard_tokenizer, tokenizer_fingerprint
from lmstack.errors import LmstackError

FORMAT = "lmstack-shards"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class ShardConfig:
    """How documents become token shards."""

    tokenizer: str = "bytes"
    """'bytes' (built-in byte-level tokenizer) or a path to a tokenizer directory / tokenizer.json."""
    bos_token: str = ""
    """BOS token string, when the tokenizer's own cannot be found by name."""
    eos_token: str = ""
    """EOS token string, likewise."""
    add_bos: bool = True
    """Start every document with BOS (the loader aligns rows to it)."""
    add_eos: bool = False
    """End every document with EOS."""
    docs_per_shard: int = 8192
    """Close a shard after this many documents."""
    chars_per_shard: int = 64_000_000
    """...or after this many characters of text, whichever comes first."""
    compression: Literal["none", "zstd"] = "none"
    """zstd-compress shard token files (smaller; the loader then decompresses into memory instead of mapping)."""
    zstd_level: int = 10
    """zstd compression level (1-22)."""

    def __post_init__(self) -> None:
        if self.docs_per_shard < 1 or self.chars_per_shard < 1:
            raise ValueError("shards.docs_per_shard and shards.chars_per_shard must be >= 1")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"shards.zstd_level={self.zstd_level} must be in [1, 22]")


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write via a temp file + rename; return the sha256 of what was written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; shards are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a shard directory, or None when there is none yet."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmstackError(f"{file} is corrupt: {e}") from None
    if manifest.get("format") != FORMAT:
        raise LmstackError(f"{file} is not an lmstack shard manifest")
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    shards = sorted(manifest["shards"], key=lambda e: e["index"])
    manifest["shards"] = shards
    manifest["total_tokens"] = sum(e["n_tokens"] for e in shards)
    manifest["total_docs"] = sum(e["n_docs"] for e in shards)
    manifest["bytes"] = sum(e["bytes"] for e in shards)
    manifest["raw_bytes"] = sum(e["raw_bytes"] for e in shards)
    atomic_write_text(Path(path) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def plan_shards(docs: Iterable[Doc], cfg: ShardConfig, start_index: int = 0) -> Iterator[dict[str, Any]]:
    """Group documents into shard jobs: {'index', 'texts', 'ids', 'sources', 'input_sha256'}."""
    index = start_index
    texts: list[str] = []
    ids: list[str] = []
    sources: dict[str, int] = {}
    chars = 0
    h = hashlib.sha256()

    def job() -> dict[str, Any]:
        return {"index": index, "texts": texts, "ids": ids, "sources": sources, "input_sha256": h.hexdigest()}

    for doc in docs:
        texts.append(doc["text"])
        ids.append(doc["id"])
        sources[doc["source"]] = sources.get(doc["source"], 0) + 1
        chars += len(doc["text"])
        h.update(doc["id"].encode() + b"\0" + doc["text"].encode("utf-8", "surrogatepass") + b"\0")
        if len(texts) >= cfg.docs_per_shard or chars >= cfg.chars_per_shard:
            yield job()
            index += 1
            texts, ids, sources, chars, h = [], [], {}, 0, hashlib.sha256()
    if texts:
        yield job()


def shard_names(index: int, compression: str) -> tuple[str, str]:
    base = f"shard_{index:05d}"
    return base + (".bin.zst" if compression == "zstd" else ".bin"), base + ".idx.npy"


# ---- worker side ---------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(out_dir: str, cfg: ShardConfig) -> None:
    _WORKER.clear()
    try:
        _WORKER.update(out=Path(out_dir), cfg=cfg, tok=load_shard_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token))
    except Exception as e:  # noqa: BLE001 - an initializer that raises makes Pool respawn workers forever
        _WORKER["error"] = e


def _build_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one shard's documents and write its files atomically; return its manifest entry."""
    if "error" in _WORKER:
        raise _WORKER["error"]
    out, cfg, tok = _WORKER["out"], _WORKER["cfg"], _WORKER["tok"]
    dtype = np.dtype(token_dtype(tok.vocab_size)).newbyteorder("<")
    head = [tok.bos_id] if cfg.add_bos else []
    tail = [tok.eos_id] if cfg.add_eos else []
    encoded = [head + ids + tail for ids in tok.encode_batch(job["texts"])]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for e in encoded for t in e), dtype=np.int64, count=int(offsets[-1]))
    if flat.size and (flat.min() < 0 or flat.max() >= tok.vocab_size):
        raise LmstackError(f"shard {job['index']}: token id {int(flat.max())} outside the vocabulary ({tok.vocab_size})")
    raw = flat.astype(dtype).tobytes()
    data = raw
    if cfg.compression == "zstd":
        data = zstandard.ZstdCompressor(level=cfg.zstd_level).compress(raw)
    bin_name, idx_name = shard_names(job["index"], cfg.compression)
    buf = io.BytesIO()
    np.save(buf, offsets, allow_pickle=False)
    index_sha = _atomic_write_bytes(out / idx_name, buf.getvalue())
    sha = _atomic_write_bytes(out / bin_name, data)
    return {"index": job["index"], "file": bin_name, "index_file": idx_name, "n_docs": len(encoded),
            "n_tokens": int(offsets[-1]), "bytes": len(data), "raw_bytes": len(raw), "sha256": sha,
            "index_sha256": index_sha, "input_sha256": job["input_sha256"], "sources": job["sources"]}


# ---- main side -----------------------------------------------------------------------------------
def entry_valid(out: Path, entry: dict[str, Any]) -> bool:
    """The shard's files exist and match the checksums its manifest entry records."""
    return (_sha256_file(out / entry["file"]) == entry["sha256"]
            and _sha256_file(out / entry["index_file"]) == entry["index_sha256"])


def remove_temp_files(out: Path) -> int:
    """Delete leftovers of killed writes (they never count as shards); return how many."""
    n = 0
    for f in out.glob(".*.tmp"):
        if f.name.startswith((".shard_", f".{MANIFEST}")):
            f.unlink(missing_ok=True)
            n += 1
    return n


def _header(cfg: ShardConfig) -> dict[str, Any]:
    tok = load_shard_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token)
    if cfg.add_bos and tok.bos_id is None:
        raise LmstackError(f"tokenizer {cfg.tokenizer} has no BOS token: name it with shards.bos_token or set add_bos=false")
    if cfg.add_eos and tok.eos_id is None:
        raise LmstackError(f"tokenizer {cfg.tokenizer} has no EOS token: name it with shards.eos_token or set add_eos=false")
    return {"format": FORMAT, "version": VERSION, "dtype": token_dtype(tok.vocab_size), "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer": cfg.tokenizer,
            "tokenizer_sha256": tokenizer_fingerprint(cfg.tokenizer), "compression": cfg.compression,
            "add_bos": cfg.add_bos, "add_eos": cfg.add_eos}


HEADER_KEYS = ("dtype", "vocab_size", "bos_id", "eos_id", "tokenizer_sha256", "compression", "add_bos", "add_eos")


def write_shards(docs: Iterable[Doc], out_dir: str | Path, cfg: ShardConfig, workers: int = 1, start_index: int = 0,
                 generation: int = 0, progress: bool = False, map_fn: Callable = parallel_map) -> dict[str, Any]:
    """Tokenize `docs` into shards numbered from `start_index`, resuming work a killed run left.

    map_fn is the ordered parallel map that runs the shard jobs (parallel_map's signature): a
    process pool by default, Ray tasks under the Ray executor; the bytes written are the same.

    Shards before `start_index` are never touched (online expansion appends after them). Entries
    at or after it that this plan no longer produces (a rerun over less data) are removed.
    Returns the manifest, with 'resumed' (shards reused) and 'written' (shards tokenized) counts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    header = _header(cfg)
    manifest = read_manifest(out)
    if manifest is None:
        manifest = {**header, "shards": []}
    else:
        clash = [k for k in HEADER_KEYS if manifest.get(k) != header[k]]
        if clash:
            raise LmstackError(f"{out} holds shards made with different settings ({', '.join(clash)}); "
                               "use a new output directory")
    existing = {e["index"]: e for e in manifest["shards"]}
    reused: list[int] = []

    def todo() -> Iterator[dict[str, Any]]:
        for job in plan_shards(docs, cfg, start_index):
            old = existing.get(job["index"])
            if old is not None and old["input_sha256"] == job["input_sha256"] and entry_valid(out, old):
                reused.append(job["index"])
                continue
            yield job

    bar = None
    if progress:
        bar = tqdm(desc="shards", unit="shard")
    planned = set()
    written = 0
    for entry in map_fn(_build_shard, todo(), workers, _init_worker, (str(out), cfg)):
        entry["generation"] = generation
        existing[entry["index"]] = entry
        manifest["shards"] = list(existing.values())
        write_manifest(out, manifest)  # after every shard: a kill loses at most the shards in flight
        written += 1
        planned.add(entry["index"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tokens=sum(e["n_tokens"] for e in existing.values()))
    if bar is not None:
        bar.close()
    planned.update(reused)
    for idx in [i for i in existing if i >= start_index and i not in planned]:
        stale = existing.pop(idx)
        for name in (stale["file"], stale["index_file"]):
            (out / name).unlink(missing_ok=True)
    manifest["shards"] = list(existing.values())
    write_manifest(out, manifest)
    return {**manifest, "resumed": len(reused), "written": written}


class ShardSet:
    """Read access to a shard directory: memory-mapped (or decompressed) tokens and document offsets."""

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise LmstackError(f"{self.path} holds no {MANIFEST}; write shards there first")
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.tokens: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        for e in manifest["shards"]:
            if verify and not entry_valid(self.path, e):
                raise LmstackError(f"shard {self.path / e['file']} does not match its checksum in {MANIFEST}")
            self.tokens.append(self._open(e))
            offsets = np.load(self.path / e["index_file"], allow_pickle=False)
            if len(offsets) != e["n_docs"] + 1 or offsets[-1] != len(self.tokens[-1]):
                raise LmstackError(f"shard {e['file']}: index and token file disagree (corrupt shard)")
            self.offsets.append(offsets)
        counts = [len(o) - 1 for o in self.offsets]
        self.doc_start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.doc_start[1:])

    def _open(self, e: dict[str, Any]) -> np.ndarray:
        file = self.path / e["file"]
        if not file.is_file():
            raise LmstackError(f"shard file {file} listed in {MANIFEST} is missing")
        if self.manifest["compression"] == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(file.read_bytes(), max_output_size=e["raw_bytes"])
            return np.frombuffer(raw, dtype=self.dtype)
        if e["n_tokens"] == 0:
            return np.empty(0, dtype=self.dtype)
        return np.memmap(file, dtype=self.dtype, mode="r")

    @property
    def n_docs(self) -> int:
        return int(self.doc_start[-1])

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    def doc_lengths(self) -> np.ndarray:
        """Token count of every document, in global document order."""
        if not self.offsets:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.diff(o) for o in self.offsets])

    def doc(self, i: int) -> np.ndarray:
        """Tokens of global document i (a view into the shard)."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range ({self.n_docs} documents)")
        s = int(np.searchsorted(self.doc_start, i, side="right") - 1)
        j = i - int(self.doc_start[s])
        return self.tokens[s][self.offsets[s][j]:self.offsets[s][j + 1]]
