"""`lmstack pretrain`: build the model, data, objective, optimizer and schedule from one run config,
then train with the Trainer. Recipes in recipes/*.yaml are PretrainConfig files.

The run directory gets config.yaml (the resolved config), metrics.jsonl (+ tensorboard/ event files
with --log.tensorboard true), loss.png and checkpoints/step_*/ (the model there loads with lmstack.load_model).
Run again over the same directory, it resumes from the newest checkpoint that verifies; it refuses to
start from step 0 over checkpoints (all corrupt, or train.resume false) unless --train.restart true,
which moves the earlier run into replaced/<UTC time>/ first (see lmstack.train.trainer).

Usage:
    lmstack pretrain --config recipes/shakespeare_char.yaml --train.steps 500
    from lmstack.train.pretrain import PretrainConfig, pretrain
    summary = pretrain(PretrainConfig(...))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.config import save_config
from lmstack.data.loader import DomainMixLoader, LoaderConfig, TokenLoader
from lmstack.data.mixing import AdaptiveConfig, AdaptiveWeights, DoReMi
from lmstack.data.shards import ShardSet
from lmstack.data.windows import RandomWindows
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model
from lmstack.model.transformer import Transformer
from lmstack.model.vocab import check_vocab, padded_real_vocab_size
from lmstack.runtime.device import resolve_device
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer, train_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import DistributedConfig
from lmstack.train.distributed import all_reduce_mean, data_parallel_info, full_state_dict, init_distributed, parallelize, place_model, wrap_optimizer
from lmstack.train.metrics import LogConfig
from lmstack.train.objectives import ObjectiveConfig, build_objective
from lmstack.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier
from lmstack.train.trainer import Trainer


@dataclass
class DataConfig:
    shards: str = ""
    """Training shard directory (from `lmstack data run`); or leave empty and give `text`."""
    val_shards: str = ""
    """Validation shard directory (optional)."""
    text: str = ""
    """A single text file read as one token stream with random windows (nanoGPT style); needs `tokenizer`."""
    val_fraction: float = 0.1
    """With `text`: the last fraction of the stream is the validation split."""
    tokenizer: str = ""
    """Tokenizer directory (defaults to the one recorded in the shards' manifest); with `text`, "char"
    builds a character-level tokenizer from the text itself (nanoGPT's Shakespeare setup)."""
    batch_size: int = 8
    """Rows per micro-batch (per rank)."""
    seq_len: int = 256
    """Tokens per row."""
    align_bos: bool = True
    """Shards: start every row at a document start (best-fit packing)."""
    doc_ids: bool = False
    """Shards: mask attention at document boundaries inside packed rows."""
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    """Several shard directories (domains) mixed by weights, fixed or DoReMi-adaptive (replaces `shards`)."""


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain"
    """Run directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (see `lmstack model info`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """What the model learns to predict."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the tokens come from."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Scale-out across processes (launch with torchrun)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics beside metrics.jsonl: TensorBoard (--log.tensorboard true), W&B (--log.wandb true)."""


class _Dist:
    """The few collective operations the Trainer uses, over lmstack.train.distributed."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.dp_size = world_size  # ranks reading distinct data (smaller under tensor parallelism)

    def all_reduce_mean(self, value: float) -> float:
        return float(all_reduce_mean(value))

    def no_sync(self, model, skip: bool):
        if skip and hasattr(model, "no_sync"):
            return model.no_sync()  # DDP: accumulate locally, all-reduce on the last micro-batch
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        return full_state_dict(model)


def _load_tokenizer(path: str):
    return load_tokenizer(path)


def build_data(cfg: PretrainConfig, rank: int, world_size: int):
    """(train loader, val loader factory, tokenizer or None, bytes per token or None)."""
    d = cfg.data
    seed = cfg.train.seed
    if d.text:
        if not d.tokenizer:
            raise LmstackError("data.text needs data.tokenizer (a tokenizer directory, or 'char')")
        try:
            text = Path(d.text).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LmstackError(f"data.text file not found: {d.text}") from None
        except UnicodeDecodeError as e:
            raise LmstackError(f"data.text {d.text} is not valid UTF-8 (byte {e.start})") from None
        if d.tokenizer == "char":
            tok = train_tokenizer(texts=[text], type="char")
        else:
            tok = _load_tokenizer(d.tokenizer)
        ids = np.array(tok.encode(text), dtype=np.int64)
        split = int(len(ids) * (1 - d.val_fraction))
        train = RandomWindows(ids[:split], d.batch_size, d.seq_len, seed=seed + 1000 * rank)
        val_ids = ids[split:]
        val = (lambda: train.sequential(val_ids)) if len(val_ids) > d.seq_len + 1 else None
        n_bytes = len(text[int(len(text) * (1 - d.val_fraction)):].encode("utf-8"))
        return train, val, tok, n_bytes / max(len(val_ids), 1)
    if not d.shards and not d.adaptive.domains:
        raise LmstackError("give data.shards (a shard directory from `lmstack data run`), data.adaptive.domains "
                           "or data.text")

    def loader(path: str, shuffle: bool, r: int, ws: int) -> TokenLoader:
        return TokenLoader(path, LoaderConfig(batch_size=d.batch_size, seq_len=d.seq_len, align_bos=d.align_bos,
                                              doc_ids=d.doc_ids, shuffle=shuffle, seed=seed, rank=r, world_size=ws))

    if d.adaptive.domains:
        if d.shards:
            raise LmstackError("give data.shards or data.adaptive.domains, not both")
        a = d.adaptive
        weights = AdaptiveWeights(list(a.domains), init=a.init or None, lr=a.step_size, smoothing=a.smoothing) \
            if a.enabled else {k: a.init.get(k, 0.0) if a.init else 1.0 for k in a.domains}
        train = DomainMixLoader(a.domains, LoaderConfig(batch_size=d.batch_size, seq_len=d.seq_len,
                                                        align_bos=d.align_bos, doc_ids=d.doc_ids, seed=seed,
                                                        rank=rank, world_size=world_size), weights)
        train.shards = train.loaders[next(iter(a.domains))].shards  # the checks below read the first domain
    else:
        train = loader(d.shards, True, rank, world_size)
    rows_needed = d.batch_size * (d.seq_len + 1)
    if train.shards.n_tokens < rows_needed:
        raise LmstackError(f"the training shards hold {train.shards.n_tokens} tokens, fewer than one batch "
                           f"({d.batch_size} x {d.seq_len + 1}); lower data.batch_size or data.seq_len")
    val = (lambda: loader(d.val_shards, False, rank, world_size)) if d.val_shards else None
    spec = train.shards.manifest.get("tokenizer", "")  # the shards' tokenizer: a directory, or "bytes"
    tok_path = d.tokenizer or (spec.get("spec", "") if isinstance(spec, dict) else spec)
    tok = _load_tokenizer(tok_path) if tok_path and Path(tok_path).exists() else None
    bpt = None
    if tok is not None and d.val_shards:
        vs = ShardSet(d.val_shards)
        sample = [vs.doc(i) for i in range(min(vs.n_docs, 200))]
        n_tok = sum(len(s) for s in sample)
        n_bytes = sum(len(tok.decode([int(t) for t in s], skip_special_tokens=True).encode("utf-8")) for s in sample)
        bpt = n_bytes / max(n_tok, 1)
    return train, val, tok, bpt


def doremi_hook(cfg: PretrainConfig, train, device, rank: int, world_size: int):
    """The DoReMi trainer hook for data.adaptive: probe loaders per domain (their own order), the reference model."""

    a, d = cfg.data.adaptive, cfg.data
    if not Path(a.reference).is_dir():
        raise LmstackError(f"data.adaptive.reference model directory not found: {a.reference}")
    reference = load_model(a.reference, lazy=False).to(device)
    if reference.config.vocab_size != cfg.model.vocab_size:
        raise LmstackError(f"data.adaptive.reference has vocab_size {reference.config.vocab_size}, the model "
                           f"{cfg.model.vocab_size}; the reference must use the same tokenizer")
    probe_cfg = LoaderConfig(batch_size=a.probe_rows, seq_len=d.seq_len, align_bos=d.align_bos,
                             seed=cfg.train.seed + 12345, rank=rank, world_size=world_size)
    probes = {k: TokenLoader(path, probe_cfg) for k, path in a.domains.items()}
    return DoReMi(a, train.weight_source, probes, reference)


def pretrain(cfg: PretrainConfig, log=print, hooks: tuple | list = ()) -> dict[str, Any]:
    """Train a model from scratch (or resume the run in cfg.out) and return a summary."""

    set_threads(cfg.train.threads)  # 0 = auto: fits a shared machine instead of one thread per core
    rank, world_size, device = init_distributed(cfg.distributed) if cfg.distributed.strategy != "none" \
        else (0, 1, resolve_device(cfg.train.device))
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # restart is a one-off action: the saved config resumes this run instead of restarting it again
        save_config(replace(cfg, train=replace(cfg.train, restart=False)), out / "config.yaml")

    # Ranks of one tensor-parallel group must read the same rows: shard data by the data-parallel rank.
    dp_rank, dp_size = data_parallel_info(cfg.distributed) if world_size > 1 else (0, 1)
    train, val, tok, bytes_per_token = build_data(cfg, dp_rank, dp_size)
    model_cfg = cfg.model
    if tok is not None:
        check_vocab(model_cfg, tok, model_path="model.vocab_size", tokenizer_path=cfg.data.tokenizer or None,
                    what="pretrain", hint=f"Set model.vocab_size >= {tok.vocab_size}")
        ids = {k: getattr(tok, k.replace("_token_id", "_id"), None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        model_cfg = model_cfg.replace(**{k: v for k, v in ids.items() if getattr(model_cfg, k) is None and v is not None})
    torch.manual_seed(cfg.train.seed)
    model = Transformer(model_cfg).to(device)
    if tok is not None and cfg.objective.mask_token_id is None and getattr(tok, "mask_id", None) is not None:
        cfg.objective.mask_token_id = tok.mask_id  # the tokenizer reserves a real <|mask|> token
    objective = build_objective(cfg.objective, model_cfg, pad_id=getattr(tok, "pad_id", None))
    if tok is not None and model_cfg.real_vocab_size is None:
        # Rows past the tokenizer (and past ids the objective writes, e.g. an MLM mask) are padding: the
        # head gives them zero probability from the first step, so training never spreads mass onto them.
        model_cfg.real_vocab_size = padded_real_vocab_size(model_cfg.vocab_size, tok.vocab_size, objective.reserved)
    for p in objective.parameters():
        p.data = p.data.to(device)
    wrapped = place_model(model, cfg.distributed, device)  # activation checkpointing in one process too
    dist = None
    if world_size > 1:
        wrapped = parallelize(model, cfg.distributed, device)
        dist = _Dist(rank, world_size)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    extra = [p for p in objective.parameters() if p.requires_grad]
    if world_size > 1:
        if extra:
            raise LmstackError(f"objective.name={cfg.objective.name!r} trains parameters outside the model "
                               "(e.g. ELECTRA's generator), which the distributed strategies do not shard or sync yet; "
                               "run it in a single process")
        optimizer = wrap_optimizer(wrapped, lambda m: build_optimizer(m, cfg.optim), cfg.distributed)
    else:
        optimizer = build_optimizer(model, cfg.optim)
    if extra:
        optimizer.add_param_group({"params": extra, "lr": cfg.optim.lr, "base_lr": cfg.optim.lr, "weight_decay": 0.0})
    steps = cfg.train.steps

    def lr_at(progress: float) -> float:
        return lr_multiplier(cfg.schedule, int(progress * steps), steps)

    if dist is not None:
        dist.dp_size = dp_size
    # extra Trainer hooks (a sweep's ReportHook, which prunes a trial mid-run) run after the data mixer's
    hooks = ([doremi_hook(cfg, train, device, dp_rank, dp_size)] if cfg.data.adaptive.enabled else []) + list(hooks)
    trainer = Trainer(wrapped, objective, optimizer, lr_at, cfg.train, train, val, out, raw_model=model, dist=dist,
                      bytes_per_token=bytes_per_token, tokens_per_row=cfg.data.seq_len, log=log, hooks=hooks,
                      log_cfg=cfg.log)
    summary = trainer.fit()
    summary["parameters"] = model.num_parameters()
    summary["out"] = str(out)
    if tok is not None and rank == 0 and summary.get("checkpoint"):
        tok.save(Path(summary["checkpoint"]) / "model")  # the checkpoint's model dir is then self-contained
    return summary
