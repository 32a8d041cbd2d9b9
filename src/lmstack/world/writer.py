"""The world writer: generate_world writes the synthetic world to disk as JSONL splits plus a manifest.

Layout of `out_dir`:
    manifest.json              seed, size, config, per-file record counts / bytes / sha256, per-kind counts
    world.json                 the entity table (people with their QA split, cities, countries, ...)
    <corpus>/train.jsonl       one JSON record per line; every record has text, id, source, split, kind
    <corpus>/val.jsonl
    <corpus>/test.jsonl

Each file is written to a temporary name and renamed when complete, and the manifest is written
last, so a killed run never leaves a file that looks finished. The same seed and config produce
byte-identical files (the manifest's sha256 values are the determinism fingerprint).

Usage:
    from lmstack.world import generate_world
    manifest = generate_world("data/world", size="small", seed=0)
    manifest["counts"]["qa"]      # {"train": ..., "val": ..., "test": ...}
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tqdm import tqdm

from lmstack.config import atomic_write_text, to_dict
from lmstack.world.config import WorldConfig
from lmstack.world.world import World
from lmstack.errors import LmstackError

SPLITS = ("train", "val", "test")
REQUIRED_FIELDS = ("text", "id", "source", "split", "kind")
MANIFEST_VERSION = 1


class _SplitWriter:
    """Three temporary JSONL files (one per split) that become real only on commit()."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.files, self.tmp, self.hash, self.count, self.bytes = {}, {}, {}, {}, {}
        for split in SPLITS:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{split}.jsonl.", suffix=".tmp")
            self.files[split] = os.fdopen(fd, "wb")
            self.tmp[split] = tmp
            self.hash[split] = hashlib.sha256()
            self.count[split] = self.bytes[split] = 0

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        split = record["split"]
        self.files[split].write(line)
        self.hash[split].update(line)
        self.count[split] += 1
        self.bytes[split] += len(line)

    def commit(self) -> None:
        for split in SPLITS:
            f = self.files[split]
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.tmp[split], self.folder / f"{split}.jsonl")

    def abort(self) -> None:
        for split in SPLITS:
            self.files[split].close()
            Path(self.tmp[split]).unlink(missing_ok=True)


def _check(record: dict, corpus: str) -> None:
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing or record["split"] not in SPLITS or not isinstance(record["text"], str):
        raise LmstackError(f"corpus {corpus!r} produced a malformed record {record.get('id')!r}: "
                           f"missing {missing} or bad split {record.get('split')!r}")


def generate_world(out_dir: str | os.PathLike, size: str = "small", seed: int = 0,
                   config: WorldConfig | None = None, progress: bool = True) -> dict:
    """Generate the world for (size, seed) -- or `config` -- into `out_dir`; return the manifest.

    The manifest has: name, version, seed, size, config, files ({"qa/train.jsonl": {"records",
    "bytes", "sha256"}}), counts ({corpus: {split: n}}), kinds ({corpus: {kind: n}}), text_bytes
    ({corpus: UTF-8 bytes of all `text` fields}), pretrain_bytes (the pretraining text, all splits),
    approx_pretrain_tokens (bytes / 4) and qa_holdout (people and templates per split).
    """
    cfg = config if config is not None else WorldConfig(size=size, seed=seed)
    if config is not None and (size != "small" or seed != 0) and (size, seed) != (cfg.size, cfg.seed):
        raise LmstackError("pass size/seed either directly or inside config=, not both")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    world = World(config=cfg)
    files, counts, kinds, text_bytes = {}, {}, {}, {}
    for corpus in cfg.corpora:
        writer = _SplitWriter(out / corpus)
        kinds[corpus], text_bytes[corpus] = {}, 0
        try:
            for record in tqdm(world.iter_corpus(corpus), desc=f"world/{corpus}", unit=" rec",
                               disable=not progress, leave=False):
                _check(record, corpus)
                writer.write(record)
                kinds[corpus][record["kind"]] = kinds[corpus].get(record["kind"], 0) + 1
                text_bytes[corpus] += len(record["text"].encode("utf-8"))
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        counts[corpus] = dict(writer.count)
        for split in SPLITS:
            files[f"{corpus}/{split}.jsonl"] = {"records": writer.count[split], "bytes": writer.bytes[split],
                                                "sha256": writer.hash[split].hexdigest()}
    world_json = json.dumps(world.to_json(), ensure_ascii=False, indent=1)
    atomic_write_text(out / "world.json", world_json)
    files["world.json"] = {"records": len(world.people), "bytes": len(world_json.encode()),
                           "sha256": hashlib.sha256(world_json.encode()).hexdigest()}
    pretrain_bytes = text_bytes.get("pretrain", 0)
    manifest = {
        "name": "lmstack-synthetic-world", "version": MANIFEST_VERSION, "seed": cfg.seed, "size": cfg.size,
        "config": to_dict(cfg), "files": files, "counts": counts, "kinds": kinds, "text_bytes": text_bytes,
        "pretrain_bytes": pretrain_bytes, "approx_pretrain_tokens": pretrain_bytes // 4,
        "qa_holdout": {"people": {s: len(world.people_in(s)) for s in SPLITS},
                       "templates_per_attribute": {"train": 4, "val": 1, "test": 1},
                       "rule": "val/test people's QA pairs and val/test templates appear in no train file"},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Load one JSONL file of the world (a small helper for tests and notebooks)."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"no such JSONL file: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LmstackError(f"{path}:{i} is not valid JSON: {e.msg}") from None
    return out
