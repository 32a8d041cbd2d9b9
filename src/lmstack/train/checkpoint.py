"""Training checkpoints that are atomic, verifiable and exact, and never silently lost.

A checkpoint is a directory `step_00000100/` holding the model in HF layout (loadable with
lmstack.load_model), the optimizer state and everything else a bit-exact resume needs (step, RNG
states, data-loader position, averaged weights) as safetensors + JSON, and last a manifest with the
size and SHA-256 of every file. It is written into a hidden temporary directory and renamed into
place, so a run killed mid-save leaves no directory that looks complete.

Verification (`verify`) passes only when the manifest is a JSON object whose `step` matches the
directory, whose `files` list is non-empty, names only plain relative paths inside the checkpoint
(no `..`, no absolute paths, no symlinks), includes every file a resume reads, and every listed file
exists with the listed size and hash. Manifests written before sizes were recorded ({name: sha256})
still verify by hash.

A checkpoint that fails verification is never deleted: it is moved aside into `corrupt/` (renamed,
so atomically; a CORRUPT.txt inside says why) and does not count towards `keep`. `latest()` returns
the newest checkpoint that verifies and logs each one it skipped, why, and where it went. Only the
newest `keep` good checkpoints are kept.

Usage:
    ckpts = CheckpointManager("runs/x/checkpoints", keep=3)
    ckpts.save(step, model, optimizer_state, extra_state)
    found = ckpts.latest()                  # newest checkpoint that verifies (broken ones moved aside), or None
    model_dir, optimizer_state, extra = ckpts.load(found)
    ckpts.exists()                          # any checkpoint here, good or corrupt (the Trainer's restart guard)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
import re
import shutil
import tempfile
import time
from typing import Any, Callable

import torch

from lmstack.config import atomic_write_text, to_dict
from lmstack.errors import LmstackError
from lmstack.model.hf_io import save_model
from lmstack.train.state_io import load_tree, save_tree

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # files: {name: {"size": bytes, "sha256": hex}}; format 1 had {name: hex}
CORRUPT = "corrupt"  # subfolder that receives checkpoints which fail verification
NOTE = "CORRUPT.txt"  # inside a moved-aside checkpoint: why it was moved
STATE_FILES = ("optimizer.safetensors", "optimizer.json", "state.safetensors", "state.json")
_STEP_DIR = re.compile(r"step_(\d{8,})")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k) and k != "name"]


def safe_name(name: Any) -> bool:
    """A manifest file name we may open: a normalised relative POSIX path with no '..' (checked again
    against symlinks when the file is opened)."""
    if not isinstance(name, str) or not name or len(name) > 255 or not name.isprintable() or "\\" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and str(p) == name and all(part not in ("", ".", "..") for part in p.parts)


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep: int = 3, writer: bool = True):
        """writer=False (every distributed rank but 0): read and verify, never move or delete anything."""
        if keep < 1:
            raise LmstackError(f"keep_checkpoints={keep} is not allowed; it must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.writer = writer
        self._good: set[str] = set()  # names this manager wrote or verified (pruning need not hash them again)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # ---- writing
    def save(self, step: int, model, optimizer_state: Any, extra: dict[str, Any],
             model_state: dict[str, torch.Tensor] | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".step_{step:08d}.", suffix=".tmp"))
        try:
            self.write_model(model, tmp, model_state)
            save_tree(optimizer_state, tmp / "optimizer")
            save_tree(extra, tmp / "state")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {"format": MANIFEST_FORMAT, "step": step, "model_config": to_dict(model.config),
                        "files": {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
                                  for p in files}}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            final = self.path(step)
            old = None
            if final.exists():  # re-saving a step (a finished run resumed): swap, then drop the old copy
                old = self.root / f".{final.name}.replaced.tmp"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)  # the checkpoint appears complete or not at all
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._good.add(final.name)
        self._prune()
        return final

    def write_model(self, model, folder: Path, model_state: dict[str, torch.Tensor] | None) -> None:
        """The model part of a checkpoint: the whole model in HF layout (subclasses may store less and
        then override model_files)."""

        save_model(model, folder / "model", state_dict=model_state)

    def model_files(self, path: Path, files: dict[str, Any]) -> list[str]:
        """The files of the model part a resume reads; the manifest must list each of them."""
        index = "model/model.safetensors.index.json"
        if index not in files:
            return ["model/config.json", "model/model.safetensors"]
        try:  # the index's hash was checked before this is called
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return ["model/config.json", index, "model/(a readable weight_map)"]
        names = [f"model/{s}" if isinstance(s, str) and safe_name(f"model/{s}") else "model/(a shard named outside "
                 "the checkpoint)" for s in shards]  # the second is never listed, so verification fails naming it
        return ["model/config.json", index, *names]

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints that verify; move corrupt ones aside (they never count)."""
        good = 0
        for path in reversed(self.list()):
            if path.name not in self._good:
                problem = self.verify(path)
                if problem is not None:
                    self.move_aside(path, problem)
                    continue
                self._good.add(path.name)
            good += 1
            if good > self.keep:
                shutil.rmtree(path, ignore_errors=True)
                self._good.discard(path.name)
        for stale in self.root.glob(".step_*.tmp"):  # leftovers of killed saves
            shutil.rmtree(stale, ignore_errors=True)

    def move_aside(self, path: Path, problem: str, log: Callable[[str], None] | None = None) -> Path | None:
        """Rename a broken checkpoint into corrupt/ (never delete it), with a note of why. Returns where it went."""
        if not self.writer:
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:  # the note goes in first, so a kill before the rename leaves the checkpoint where it was, noted
            atomic_write_text(path / NOTE, f"moved aside by lmstack at {when}: {problem}\n")
        except OSError:
            pass  # an unwritable checkpoint is still moved; the caller's log line says why
        dest_dir = self.root / CORRUPT
        dest_dir.mkdir(exist_ok=True)
        for i in range(1000):  # the same step can go bad twice (a resumed run saves it again)
            dest = dest_dir / (path.name if i == 0 else f"{path.name}.{i}")
            if dest.exists():
                continue
            try:
                os.rename(path, dest)
            except FileExistsError:
                continue
            except OSError as e:
                if log:
                    log(f"lmstack: could not move {path} aside into {dest_dir}: {e.strerror}")
                return None
            self._good.discard(path.name)
            return dest
        return None

    # ---- reading
    def list(self) -> list[Path]:
        """Checkpoint directories (complete or not) in step order; corrupt/ and hidden temp dirs excluded."""
        if not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def corrupt(self) -> list[Path]:
        """Checkpoints moved aside into corrupt/."""
        folder = self.root / CORRUPT
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def exists(self) -> bool:
        """Whether this directory holds any checkpoint, good or corrupt (starting over would hide it)."""
        return bool(self.list()) or bool(self.corrupt())  # step dirs first: a concurrent move_aside cannot hide one

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint is intact, else what is wrong with it (never echoing file contents)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return "no manifest (the save did not finish)"
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (OSError, ValueError, RecursionError):  # ValueError covers bad JSON and bad UTF-8
            return "manifest.json is not readable JSON"
        if not isinstance(manifest, dict):
            return "manifest.json is not a JSON object"
        m = _STEP_DIR.fullmatch(path.name)
        step = manifest.get("step")
        if m and (not isinstance(step, int) or isinstance(step, bool) or step != int(m.group(1))):
            return "manifest.json's step does not match the directory name"
        if not isinstance(manifest.get("model_config"), dict):
            return "manifest.json has no model_config object"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return "manifest.json lists no files"
        expected: dict[str, tuple[int | None, str]] = {}
        for i, (name, entry) in enumerate(files.items()):
            if not safe_name(name) or name == MANIFEST:
                return f"manifest.json entry {i} names a path that is not a plain file inside the checkpoint"
            size, digest = (None, entry) if isinstance(entry, str) else \
                (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                return f"manifest.json entry {name!r} has no valid sha256"
            if isinstance(entry, dict) and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
                return f"manifest.json entry {name!r} has no valid size"
            expected[name] = (size, digest)
        unlisted = [f for f in STATE_FILES if f not in expected]
        if unlisted:
            return f"manifest.json does not list {unlisted[0]}, which a resume reads"
        root = path.resolve()
        for name, (size, _) in expected.items():  # cheap checks first: truncation shows without hashing
            f = path / name
            if f.is_symlink() or not f.resolve().is_relative_to(root):
                return f"{name} is a symlink or resolves outside the checkpoint"
            if not f.is_file():
                return f"missing file {name}"
            if size is not None and f.stat().st_size != size:
                return (f"size mismatch in {name}: {f.stat().st_size} bytes, manifest says {size} "
                        "(truncated or corrupted)")
        for name, (_, digest) in expected.items():
            try:
                if sha256(path / name) != digest:
                    return f"checksum mismatch in {name} (truncated or corrupted)"
            except OSError as e:
                return f"cannot read {name}: {e.strerror}"
        unlisted = [f for f in self.model_files(path, expected) if f not in expected]
        if unlisted:
            return f"manifest.json does not list {unlisted[0]}, which a resume reads"
        return None

    def latest(self, log: Callable[[str], None] = print) -> Path | None:
        """The newest checkpoint that verifies. Each newer broken one is logged with why, and moved into
        corrupt/ (by the writer); older ones are left for pruning to judge."""
        for path in reversed(self.list()):
            problem = self.verify(path)
            if problem is None:
                self._good.add(path.name)
                return path
            dest = self.move_aside(path, problem, log=log)
            where = f"moved to {dest}" if dest else "left in place"
            log(f"lmstack: skipping checkpoint {path}: {problem}; {where}; trying the previous one")
        return None

    def load(self, path: Path, model_config=None) -> tuple[Path, Any, dict[str, Any]]:
        """(model directory, optimizer state, extra state); refuses a checkpoint that does not verify or was
        made for another model config."""
        if path.name not in self._good:
            problem = self.verify(path)
            if problem is not None:
                raise LmstackError(f"refusing to resume from {path}: {problem}")
            self._good.add(path.name)
        manifest = json.loads((path / MANIFEST).read_text())
        if model_config is not None:
            diffs = config_differences(manifest["model_config"], to_dict(model_config))
            if diffs:
                raise LmstackError(f"refusing to resume from {path}: the model config changed ({'; '.join(diffs)})")
        return path / "model", load_tree(path / "optimizer"), load_tree(path / "state")
