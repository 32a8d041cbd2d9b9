"""The training loop: accumulation, clipping, noise, spike guard, precision, averaging, eval, checkpoints.

The Trainer takes built parts (model, objective, optimizer, data loaders) and runs `TrainConfig`.
Everything a bit-exact resume needs (optimizer, RNG states, loader position, averaged weights,
counters) goes into each checkpoint, so on CPU in fp32 a run killed at step N and resumed continues
with exactly the losses an uninterrupted run would have logged.

A run directory that already holds checkpoints is never silently started over: with `resume` the
newest checkpoint that verifies is loaded (broken ones are logged and moved into checkpoints/corrupt/,
see checkpoint.py); when none verifies, or when `resume` is off, training refuses unless `restart` is
set, which first moves the earlier run's checkpoints and metrics into replaced/<UTC time>/.

Usage:
    trainer = Trainer(model, objective, optimizer, schedule_fn, cfg, train_loader, val_loader_fn, out_dir)
    summary = trainer.fit()
"""
from __future__ import annotations

import math
from pathlib import Path
import time
from typing import Any, Callable, Iterable

import torch

from lmstack.errors import LmstackError
from lmstack.train.averaging import EMA, SWA, average_checkpoints, swapped
from lmstack.train.checkpoint import CheckpointManager
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import (clip_grad_norm_, distribute_like, full_optimizer_state_dict, gather_full,
                                       load_full_optimizer_state_dict, load_full_state_dict, total_grad_norm)
from lmstack.model.counting import model_stats
from lmstack.model.hf_io import load_model
from lmstack.progress import BudgetBar
from lmstack.train.metrics import MetricsLogger, matmul_peak
from lmstack.train.noise_scale import AdaptiveBatch, NoiseScale
from lmstack.train.precision import Precision
from lmstack.train.rng import restore_rng, rng_state

OOM_ADVICE = ("out of memory: lower data.batch_size (and raise train.grad_accum to keep the global batch), "
              "or, in pretrain, set distributed.activation_checkpointing=true or shard the model with "
              "distributed.strategy=fsdp2")


def _grad_sq_norm(params: list[torch.nn.Parameter]) -> float:
    # total_grad_norm also sums sharded (DTensor) gradients across ranks, so FSDP2/TP see the true norm
    return float(total_grad_norm(params)) ** 2


class Trainer:
    def __init__(self, model: torch.nn.Module, objective, optimizer: torch.optim.Optimizer,
                 lr_at: Callable[[float], float], cfg: TrainConfig, train_loader,
                 val_loader: Callable[[], Iterable] | None, out_dir: str | Path, *, raw_model=None,
                 dist=None, bytes_per_token: float | None = None, tokens_per_row: int | None = None,
                 log: Callable[[str], None] = print, hooks: list | None = None, log_cfg=None):
        """lr_at(progress in [0, 1]) -> LR multiplier; raw_model: the unwrapped Transformer (for saving);
        log_cfg: a LogConfig (TensorBoard / W&B beside metrics.jsonl; None = JSONL only);
        hooks: objects with after_step(trainer) -> metrics dict, state_dict() and load_state_dict() (e.g. the
        DoReMi domain reweighting of lmstack.data.mixing)."""
        self.hooks = list(hooks or [])
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.raw = raw_model if raw_model is not None else model
        self.lr_at, self.cfg = lr_at, cfg
        self.train_loader, self.val_loader = train_loader, val_loader
        self.out = Path(out_dir)
        self.dist = dist  # object with rank/world_size/all_reduce_mean/no_sync, or None
        self.main = dist is None or dist.rank == 0
        self.log_fn = log
        self.device = next(self.raw.parameters()).device
        self.precision = Precision.resolve(cfg.precision, self.device)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)       # objective's random choices
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 2)       # gradient noise
        self.ema = EMA(self.raw, cfg.ema_decay) if cfg.ema_decay else None
        self.swa = SWA(self.raw) if cfg.swa_start else None
        self.gns = NoiseScale() if cfg.adaptive_batch else None
        self.adaptive = AdaptiveBatch(cfg.max_grad_accum) if cfg.adaptive_batch else None
        self.accum = cfg.grad_accum
        self.step = 0
        self.tokens_seen = 0
        self.skipped = 0
        self.loss_mean: float | None = None
        self.bytes_per_token = bytes_per_token
        self.tokens_per_row = tokens_per_row
        self.ckpts = CheckpointManager(self.out / "checkpoints", keep=cfg.keep_checkpoints, writer=self.main)
        self._guard_run_dir()  # before the metrics file opens: a restart moves the old one aside
        self.metrics = MetricsLogger(self.out, log=log_cfg, model=self.raw) if self.main else None

    # ---- starting over, resuming, refusing
    def _guard_run_dir(self) -> None:
        """restart: move the earlier run aside; resume off over existing checkpoints: refuse."""
        if self.cfg.restart:
            if self.main:
                self._move_earlier_run_aside()
            return
        if not self.cfg.resume and self.ckpts.exists():
            raise LmstackError(f"{self.ckpts.root} holds checkpoints and train.resume is false: refusing to start "
                               f"from step 0 over them. Resume (train.resume true), or pass --train.restart true "
                               f"to move them aside into {self.out / 'replaced'}/ and start over")

    def _move_earlier_run_aside(self) -> None:
        # Renames only (atomic, nothing deleted); checkpoints first, so a kill in between leaves no checkpoint
        # that a later resume could mix with the new run's metrics.
        names = [n for n in ("checkpoints", "metrics.jsonl", "loss.png", "tensorboard") if (self.out / n).exists()]
        if not names:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.out / "replaced" / stamp
        i = 1
        while dest.exists():
            dest, i = self.out / "replaced" / f"{stamp}.{i}", i + 1
        dest.mkdir(parents=True)
        for n in names:
            (self.out / n).rename(dest / n)
        self.log_fn(f"lmstack: train.restart: moved the earlier run's {', '.join(names)} to {dest}")

    def _resume_or_refuse(self) -> None:
        had = self.ckpts.exists()
        if self.try_resume() or not had:
            return
        raise LmstackError(f"{self.ckpts.root} holds checkpoints but none verifies (see the lines above and "
                           f"{self.ckpts.root / 'corrupt'}/*/CORRUPT.txt): refusing to start from step 0 over them. "
                           f"Repair them, or pass --train.restart true to move them aside into "
                           f"{self.out / 'replaced'}/ and start over")

    # ---- state for exact resume
    def _extra_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "skipped": self.skipped, "accum": self.accum,
            "loss_mean": self.loss_mean, "loader": self.train_loader.state_dict(),
            "rng": rng_state({"objective": self.generator, "noise": self.noise_gen}),
            "ema": gather_full(self.ema.state) if self.ema else None,
            "swa": {"count": self.swa.count, "state": gather_full(self.swa.state)} if self.swa else None,
            "gns": [self.gns.g2, self.gns.trace] if self.gns else None,
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else None,
            "hooks": [h.state_dict() for h in self.hooks],
        }

    def _restore(self, extra: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.skipped = extra["step"], extra["tokens_seen"], extra["skipped"]
        self.accum, self.loss_mean = extra["accum"], extra["loss_mean"]
        self.train_loader.load_state_dict(extra["loader"])
        restore_rng(extra["rng"], {"objective": self.generator, "noise": self.noise_gen})
        # Averaged weights were saved whole; slice them back to this rank's shards (a no-op in one process).
        if self.ema and extra.get("ema"):
            self.ema.state = {k: distribute_like(v.to(self.ema.state[k].device), self.ema.state[k])
                              for k, v in extra["ema"].items()}
        if self.swa and extra.get("swa"):
            self.swa.count = extra["swa"]["count"]
            self.swa.state = {k: distribute_like(v.to(self.swa.state[k].device), self.swa.state[k])
                              for k, v in extra["swa"]["state"].items()}
        if self.gns and extra.get("gns"):
            self.gns.g2, self.gns.trace = extra["gns"]
        if self.precision.scaler and extra.get("scaler"):
            self.precision.scaler.load_state_dict(extra["scaler"])
        if extra.get("objective") is not None and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(extra["objective"])
        for h, state in zip(self.hooks, extra.get("hooks") or []):
            h.load_state_dict(state)

    def save(self) -> Path | None:
        # Gathering is collective: every rank takes part, rank 0 writes.
        if self.dist is not None:
            model_state = self.dist.full_state_dict(self.model)
            optim_state = full_optimizer_state_dict(self.model, self.optimizer)
        else:
            model_state, optim_state = None, self.optimizer.state_dict()
        extra = self._extra_state()
        if not self.main:
            return None
        return self.ckpts.save(self.step, self.raw, optim_state, extra, model_state)

    def try_resume(self) -> bool:
        found = self.ckpts.latest(log=self.log_fn)
        if found is None:
            return False
        model_dir, opt_state, extra = self.ckpts.load(found, model_config=getattr(self.raw, "config", None))

        loaded = load_model(model_dir, dtype=None, device="cpu").state_dict()
        if self.dist is not None:
            load_full_state_dict(self.model, loaded)
            load_full_optimizer_state_dict(self.model, self.optimizer, opt_state)
        else:
            with torch.no_grad():
                for name, p in self.raw.state_dict().items():
                    p.copy_(loaded[name])
            self.optimizer.load_state_dict(opt_state)
        self._restore(extra)
        self.log_fn(f"resumed from {found} at step {self.step}")
        return True

    # ---- one optimizer step
    def _micro_batches(self):
        for i in range(self.accum):
            batch = next(self.train_loader)
            x, y = batch[0], batch[1]
            tokens = torch.cat((x, y[:, -1:]), dim=1)
            kwargs = {"doc_ids": batch[2]} if len(batch) > 2 and batch[2] is not None else {}
            prepared = self.objective.prepare(tokens, self.generator, **kwargs)
            yield i, {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prepared.items()}, x.numel()

    def train_step(self, progress: float) -> dict[str, float]:
        cfg = self.cfg
        mult = self.lr_at(progress)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        self.model.train()
        total_loss, small_sq, tokens = 0.0, None, 0
        for i, batch, n_tok in self._micro_batches():
            sync = i == self.accum - 1
            ctx = self.dist.no_sync(self.model, not sync) if self.dist is not None else _null()
            with ctx:
                with self.precision.autocast():
                    loss, _ = self.objective.loss(self.model, batch)
                self.precision.backward(loss / self.accum)
            total_loss += float(loss.detach()) / self.accum
            tokens += n_tok
            if self.gns is not None and i == 0 and self.accum > 1 and self.step % cfg.gns_every == 0:
                small_sq = _grad_sq_norm(self.params) * self.accum**2  # one micro-batch's gradient
        if self.dist is not None:
            total_loss = self.dist.all_reduce_mean(total_loss)
            tokens *= getattr(self.dist, "dp_size", self.dist.world_size)  # TP ranks share rows
        self.precision.unscale(self.optimizer)
        if small_sq is not None:
            rows = tokens // max(self.tokens_per_row or 1, 1)
            self.gns.update(small_sq, max(rows // self.accum, 1), _grad_sq_norm(self.params), max(rows, 1))
        if cfg.grad_noise_eta:
            std = math.sqrt(cfg.grad_noise_eta / (1 + self.step) ** cfg.grad_noise_gamma)
            for p in self.params:
                if p.grad is not None:  # full-shape noise, then sliced to this rank's shard (FSDP2/TP)
                    noise = torch.randn(p.shape, generator=self.noise_gen) * std
                    p.grad.add_(distribute_like(noise.to(p.device, p.grad.dtype), p.grad))
        if cfg.clip_grad_norm:
            gnorm = float(clip_grad_norm_(self.params, cfg.clip_grad_norm))
        else:
            gnorm = math.sqrt(_grad_sq_norm(self.params))
        bad = not (math.isfinite(total_loss) and math.isfinite(gnorm))
        spike = (cfg.spike_factor and self.loss_mean is not None and total_loss > cfg.spike_factor * self.loss_mean)
        if cfg.spike_guard and (bad or spike):
            self.skipped += 1
            if self.precision.scaler is not None:
                self.precision.scaler.update()
        else:
            self.precision.step(self.optimizer)
            self.loss_mean = total_loss if self.loss_mean is None else 0.9 * self.loss_mean + 0.1 * total_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        if self.ema is not None:
            self.ema.update(self.raw)
        if self.swa is not None and progress >= cfg.swa_start and self.step % cfg.swa_every == 0:
            self.swa.update(self.raw)
        if self.adaptive is not None and small_sq is not None:
            self.accum = self.adaptive.next_accum(self.accum, max(tokens // max(self.tokens_per_row or 1, 1)
                                                                  // self.accum, 1), self.gns.value)
        return {"loss": total_loss, "grad_norm": gnorm, "lr": self.optimizer.param_groups[0]["lr"],
                "tokens": tokens, "skipped": float(bad or bool(spike))}

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + 99)  # same masks every evaluation
        total, ce_total, count = 0.0, 0.0, 0
        with (swapped(self.raw, state) if state is not None else _null()):
            for i, batch in enumerate(self.val_loader()):
                if i >= self.cfg.eval_batches:
                    break
                x, y = batch[0], batch[1]
                prepared = self.objective.prepare(torch.cat((x, y[:, -1:]), 1), gen)
                prepared = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prepared.items()}
                with self.precision.autocast():
                    loss, m = self.objective.loss(self.model, prepared)
                n = m.get("n_tokens", x.numel())
                total += float(loss) * n
                ce_total += float(m.get("ce", loss)) * n  # perplexity comes from the cross-entropy alone
                count += n
        if self.dist is not None:
            ws = self.dist.world_size
            total, ce_total, count = (self.dist.all_reduce_mean(v) * ws for v in (total, ce_total, count))
        if count == 0:
            return {}
        loss, ce = total / count, ce_total / count
        out = {"val_loss": loss, "val_ce": ce, "val_ppl": math.exp(min(ce, 50))}
        if self.bytes_per_token:
            out["val_bpb"] = ce / math.log(2) / self.bytes_per_token
        return out

    # ---- the loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.resume and not cfg.restart:
            self._resume_or_refuse()

        flops_per_token = model_stats(self.raw.config, context=self.tokens_per_row).train_flops_per_token \
            if hasattr(self.raw, "config") else 0.0
        peak = matmul_peak(self.device) if self.main else 1.0

        # total and ETA follow whichever of steps / max_seconds ends the run; warns if steps slow down a lot
        bar = BudgetBar(cfg.steps, max_seconds=cfg.max_seconds, initial=self.step, desc="train",
                        enabled=cfg.progress and self.main, hint="--train.threads 1") if self.main else None
        start = time.perf_counter()
        last = {}
        window_tokens, window_start = 0, time.perf_counter()
        shown_rate = (0.0, 0.0)  # (tokens/s, MFU) shown in the progress bar until the first measurement
        val = {}
        try:
            while self.step < cfg.steps:
                elapsed = time.perf_counter() - start
                if cfg.max_seconds and elapsed >= cfg.max_seconds:
                    break
                progress = self.step / cfg.steps
                if cfg.max_seconds:
                    progress = max(progress, elapsed / cfg.max_seconds)
                try:
                    last = self.train_step(min(progress, 1.0))
                except torch.OutOfMemoryError as e:
                    raise LmstackError(OOM_ADVICE) from e
                except RuntimeError as e:
                    if "out of memory" in str(e).lower():
                        raise LmstackError(OOM_ADVICE) from e
                    raise
                window_tokens += last["tokens"]
                for h in self.hooks:  # e.g. DoReMi: new domain weights for the next batches
                    last.update(h.after_step(self))
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - window_start
                    tok_s = window_tokens / max(dt, 1e-9)
                    last.update(tokens_per_s=tok_s, mfu=tok_s * flops_per_token / peak, skipped_total=self.skipped,
                                grad_accum=self.accum, tokens_seen=self.tokens_seen)
                    if self.gns is not None:
                        last["noise_scale"] = self.gns.value
                    window_tokens, window_start = 0, time.perf_counter()
                    if self.metrics:
                        self.metrics.log(self.step, last)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    val = self._eval_all()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
                if "tokens_per_s" in last:  # the rate is measured every log_every steps; show the latest
                    shown_rate = (last["tokens_per_s"], last["mfu"])
                if bar is not None:
                    bar.update(1, work=last.get("tokens"))  # per token: growing batches are no collapse
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{shown_rate[0]:.0f}",
                                    mfu=f"{100 * shown_rate[1]:.1f}%")
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - start
        path = self.save()
        val = self._eval_all(final=True)
        summary = {"steps": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped,
                   "train_seconds": train_seconds, "final_loss": last.get("loss"), **val,
                   "checkpoint": str(path) if path else None}
        if self.metrics:
            self.metrics.plot(self.out / "loss.png")
            self.metrics.close()
        return summary

    def _eval_all(self, final: bool = False) -> dict[str, float]:
        val = self.evaluate()
        if self.ema is not None:
            val.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.state).items()})
        if self.swa is not None and self.swa.count:
            val.update({f"swa_{k}": v for k, v in self.evaluate(self.swa.state).items()})
        if final and self.cfg.average_last and self.main:
            dirs = [p / "model" for p in self.ckpts.list()[-self.cfg.average_last:]]
            if len(dirs) >= 2:
                val.update({f"ckpt_avg_{k}": v for k, v in self.evaluate(average_checkpoints(dirs)).items()})
        if val and self.metrics:
            self.metrics.log(self.step, val)
        return val


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
