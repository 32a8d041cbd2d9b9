"""Tier 2 moderation: the all-MiniLM-L6-v2 encoder (our Transformer, real weights) fine-tuned with a linear head.

The encoder reads a text (or a rendered conversation), its hidden states are mean-pooled over the real tokens
(not L2-normalised: a unit vector would cap the head's logits), and a Linear(d_model, categories) head gives
one logit per category; training is multi-label binary cross-entropy, the whole encoder at a fine-tuning rate
and the new head at a higher one. A text longer than `max_length` keeps its *end*, so a long conversation
keeps its latest turns.

A moderator directory is an encoder directory (config.json, model.safetensors, tokenizer.json) plus
moderation_head.safetensors and moderator.json ({"tier": "encoder", "categories", "thresholds",
"max_length"}); `load_moderator` checks that the head fits the encoder and the categories, so a missing or
incompatible directory fails when it is loaded (at server start), not at the first request.

`init="scratch"` trains a small new encoder on MiniLM's vocabulary instead (the fast tests use it).

Usage:
    from lmstack.safety.moderation_encoder import EncoderTrainConfig, train_encoder_moderator
    mod = train_encoder_moderator(rows, "runs/mod_minilm", EncoderTrainConfig(steps=200))
    mod.score(["How do I brew the shadow elixir of Amberhaven?"])
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer
from lmstack.progress import BudgetBar
from lmstack.rag.embed import minilm_path, pad_rows
from lmstack.safety.moderation import META_FILE, Moderator
from lmstack.safety.moderation_data import CATEGORIES, label_matrix
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer

HEAD_FILE = "moderation_head.safetensors"


class EncoderModerator(Moderator):
    """A bidirectional encoder + mean pooling + Linear(d_model, categories); sigmoid per category."""

    tier = "encoder"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, head: torch.nn.Linear | None = None,
                 categories=CATEGORIES, thresholds: dict[str, float] | None = None, max_length: int = 256,
                 batch_size: int = 32):
        super().__init__(categories, thresholds)
        cfg = model.config
        if getattr(cfg, "head", "none") != "none" or getattr(cfg, "causal", False):
            raise LmstackError("a moderation encoder must be bidirectional and return hidden states "
                               "(a bert-style model with head='none')")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.head = head or torch.nn.Linear(cfg.d_model, len(self.categories))
        if tuple(self.head.weight.shape) != (len(self.categories), cfg.d_model):
            raise LmstackError(f"the moderation head is {tuple(self.head.weight.shape)}; expected "
                               f"({len(self.categories)}, {cfg.d_model}) for {len(self.categories)} categories")
        self.max_length = min(max_length, cfg.max_seq_len)
        post = tokenizer.post_processor
        self._room = self.max_length - (len(post([])) if post is not None else 0)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.trained_steps = 0  # optimizer steps of the last train_encoder_moderator run (saved in moderator.json)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ids(self, texts: list[str]) -> list[list[int]]:
        post = self.tokenizer.post_processor
        rows = [r[-self._room:] if len(r) > self._room else r for r in self.tokenizer.encode_batch(texts)]
        return [post(r) if post is not None else r for r in rows]

    def logits(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), categories) logits; differentiable when grad is enabled (training uses it)."""
        ids, mask = pad_rows(self._ids(texts), self.pad_id, self.device)
        hidden = self.model(ids, attention_mask=mask).float()
        m = mask.to(hidden.dtype)[..., None]
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))

    def probs(self, texts: list[str]) -> np.ndarray:
        self.model.eval()
        out = np.zeros((len(texts), len(self.categories)))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                out[idx] = torch.sigmoid(self.logits([texts[i] for i in idx])).cpu().numpy()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """The encoder, tokenizer, head and moderator.json (each file written atomically)."""
        path = Path(path)
        save_model(self.model, path, tokenizer=self.tokenizer)
        tmp = path / f".{HEAD_FILE}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp))
        os.replace(tmp, path / HEAD_FILE)
        meta = {**self.meta(), "max_length": self.max_length, "trained_steps": self.trained_steps}
        atomic_write_text(path / META_FILE, json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path, meta: dict) -> "EncoderModerator":
        for name in ("config.json", "tokenizer.json", HEAD_FILE):
            if not (path / name).is_file():
                raise LmstackError(f"encoder moderator {path} has no {name}")
        try:
            state = load_file(str(path / HEAD_FILE))
        except (OSError, SafetensorError) as e:
            raise LmstackError(f"cannot read {path / HEAD_FILE}: {e}") from None
        model = load_model(path)
        categories = tuple(meta["categories"])
        head = torch.nn.Linear(model.config.d_model, len(categories))
        try:
            head.load_state_dict(state)
        except RuntimeError as e:
            raise LmstackError(f"{path / HEAD_FILE} does not fit {len(categories)} categories on an encoder with "
                               f"d_model={model.config.d_model}: an incompatible moderator ({e})") from None
        mod = cls(model.eval(), load_tokenizer(path), head, categories, meta.get("thresholds"),
                  int(meta.get("max_length") or 256))
        mod.trained_steps = int(meta.get("trained_steps") or 0)
        return mod


@dataclass
class EncoderTrainConfig:
    """How tier 2 is fine-tuned."""

    init: str = "minilm"
    """minilm (the packaged all-MiniLM-L6-v2) | scratch (a small new encoder on MiniLM's vocabulary)"""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 32
    """Texts per step."""
    lr: float = 5e-5
    """Learning rate of the encoder (the head learns at head_lr)."""
    head_lr: float = 2e-3
    """Learning rate of the new head."""
    max_length: int = 128
    """Tokens per text (a longer one keeps its end)."""
    scratch_d_model: int = 64
    """Width of an encoder trained from scratch."""
    scratch_layers: int = 1
    """Layers of an encoder trained from scratch."""
    seed: int = 0
    """Seed of the head init and the batch order."""
    threads: int = 0
    """CPU threads for torch: 0 = auto."""
    max_seconds: float = 0.0
    """Stop after this many seconds (0 = no limit); the moderator is saved either way."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.init not in ("minilm", "scratch"):
            raise LmstackError(f"init={self.init!r} must be minilm or scratch")
        for name in ("steps", "batch_size", "max_length", "scratch_d_model", "scratch_layers"):
            if getattr(self, name) < 1:
                raise LmstackError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise LmstackError("lr and head_lr must be > 0")


def _start(cfg: EncoderTrainConfig) -> tuple[torch.nn.Module, Any]:
    path = minilm_path()
    tok = load_tokenizer(path)
    if cfg.init == "minilm":
        return load_model(path), tok
    d = cfg.scratch_d_model
    heads = max(1, d // 32)
    mcfg = preset("bert-small", vocab_size=tok.vocab_size, d_model=d, n_layers=cfg.scratch_layers, n_heads=heads,
                  n_kv_heads=heads, head_dim=d // heads, d_ff=4 * d, max_seq_len=max(cfg.max_length, 128))
    return Transformer(mcfg), tok


def train_encoder_moderator(rows: list[dict], out: str | os.PathLike | None = None,
                            cfg: EncoderTrainConfig | None = None) -> EncoderModerator:
    """Fine-tune tier 2 on the rows' train split (multi-label BCE), save to `out` when given."""
    cfg = cfg or EncoderTrainConfig()
    train = [r for r in rows if r["split"] == "train"]
    if not train:
        raise LmstackError("no training rows (split 'train') to fit a moderator on")
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise LmstackError(f"{out} already exists and is not an empty directory; pick a new --out")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok = _start(cfg)
    mod = EncoderModerator(model, tok, max_length=cfg.max_length)
    texts, y = [r["text"] for r in train], torch.tensor(label_matrix(train), dtype=torch.float32)
    # Positives are rarer than negatives in every category: weight them up, as the hashed tier's balanced LR does.
    pos = y.sum(0).clamp_min(1.0)
    pos_weight = ((len(y) - pos) / pos).clamp(1.0, 10.0)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": cfg.lr},
                             {"params": mod.head.parameters(), "lr": cfg.head_lr}], weight_decay=0.01)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm))))
    rng, order = random.Random(cfg.seed), []
    bar = BudgetBar(cfg.steps, max_seconds=cfg.max_seconds, desc="moderator", enabled=cfg.progress)
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
            break
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(texts)), len(texts))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            mod.logits([texts[i] for i in idx]), y[idx].to(mod.device), pos_weight=pos_weight.to(mod.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(mod.head.parameters()), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LmstackError(f"the moderator's loss became {value} at step {step}; lower lr (now {cfg.lr})")
        mod.trained_steps = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    model.eval()
    if out is not None:
        mod.save(out)
    return mod
