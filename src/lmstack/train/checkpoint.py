"""Training checkpoints that are atomic, verifiable and exact.

A checkpoint is a directory `step_00000100/` holding the model in HF layout (loadable with
lmstack.load_model), the optimizer state and everything else a bit-exact resume needs (step, RNG
states, data-loader position, averaged weights) as safetensors + JSON, and last a manifest with the
SHA-256 of every file. It is written into a temporary directory and renamed into place, so a run
killed mid-save leaves no directory that looks complete; the manifest lets a truncated or corrupted
checkpoint be detected, reported and skipped in favour of the previous good one. Only the last
`keep` checkpoints are kept.

Usage:
    ckpts = CheckpointManager("runs/x/checkpoints", keep=3)
    ckpts.save(step, model, optimizer_state, extra_state)
    found = ckpts.latest()                  # newest checkpoint whose checksums verify, or None
    model_dir, optimizer_state, extra = ckpts.load(found)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmstack.config import atomic_write_text, to_dict
from lmstack.errors import LmstackError
from lmstack.train.state_io import load_tree, save_tree

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k) and k != "name"]


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, step: int, model, optimizer_state: Any, extra: dict[str, Any],
             model_state: dict[str, torch.Tensor] | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".step_{step:08d}.", suffix=".tmp"))
        try:
            self.write_model(model, tmp, model_state)
            save_tree(optimizer_state, tmp / "optimizer")
            save_tree(extra, tmp / "state")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {"step": step, "model_config": to_dict(model.config),
                        "files": {str(p.relative_to(tmp)): sha256(p) for p in files}}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            final = self.path(step)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)  # the checkpoint appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def write_model(self, model, folder: Path, model_state: dict[str, torch.Tensor] | None) -> None:
        """The model part of a checkpoint: the whole model in HF layout (subclasses may store less)."""
        from lmstack.model.hf_io import save_model

        save_model(model, folder / "model", state_dict=model_state)

    def _prune(self) -> None:
        done = self.list()
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp"):  # leftovers of killed saves
            shutil.rmtree(stale, ignore_errors=True)

    def list(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint is intact, else what is wrong with it."""
        manifest = path / MANIFEST
        if not manifest.exists():
            return "no manifest (the save did not finish)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError):
            return "corrupt manifest"
        for name, digest in files.items():
            f = path / name
            if not f.exists():
                return f"missing file {name}"
            if sha256(f) != digest:
                return f"checksum mismatch in {name} (truncated or corrupted)"
        return None

    def latest(self, log=print) -> Path | None:
        """The newest checkpoint that verifies; broken ones are reported and skipped."""
        for path in reversed(self.list()):
            problem = self.verify(path)
            if problem is None:
                return path
            log(f"lmstack: checkpoint {path} is unusable: {problem}; falling back to the previous one")
        return None

    def load(self, path: Path, model_config=None) -> tuple[Path, Any, dict[str, Any]]:
        """(model directory, optimizer state, extra state); refuses a checkpoint made for another model config."""
        manifest = json.loads((path / MANIFEST).read_text())
        if model_config is not None:
            diffs = config_differences(manifest["model_config"], to_dict(model_config))
            if diffs:
                raise LmstackError(f"refusing to resume from {path}: the model config changed ({'; '.join(diffs)})")
        return path / "model", load_tree(path / "optimizer"), load_tree(path / "state")
