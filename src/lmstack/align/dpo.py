"""Offline preference optimisation: DPO, cDPO, IPO (paired) and KTO (unpaired) against a reference policy.
rpo_alpha > 0 adds RPO's NLL term on the chosen replies to any paired loss.

The loss comes from the losses registry by method name; what this trainer adds is the reference:
- reference="copy": a frozen deep copy of the starting policy (or a given reference model);
- reference="precomputed": the reference's log-probs of every training and evaluation row are
  computed once up front and the copy is dropped, so training holds one model in memory;
- reference="adapters": the policy itself with its adapters switched off (LoRA training): the base
  weights *are* the reference, no copy needed. It uses `lmstack.adapt.disable_adapters(model)`, a
  context manager, imported lazily; without it this option raises a clear error.
A reference with a different tokenizer is refused (log-prob ratios across tokenizers are meaningless).

Logged each step, as TRL does: chosen/rejected implicit rewards β·(log π - log π_ref), their
margin, preference accuracy (chosen reward > rejected reward), loss, LR, gradient norm. KTO logs
its KL reference point z0 too. Held-out pairs give the same numbers before and after training.

Usage:
    from lmstack.align.dpo import PreferenceTrainer
    cfg = AlignConfig(method="dpo", beta=0.1, optim={"lr": 5e-6}, train={"steps": 200})
    trainer = PreferenceTrainer(policy, tok, cfg)
    before = trainer.evaluate(val_pairs)          # accuracy, margin, chosen/rejected rewards
    summary = trainer.fit(train_pairs, val_pairs, out_dir="runs/dpo")
"""
from __future__ import annotations

import copy
from pathlib import Path
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lmstack.align.config import METHOD_LOSS, AlignConfig
from lmstack.align.logprobs import check_same_tokenizer, check_same_vocab, collate, encode_pair, sequence_logprobs
from lmstack.align.losses import kto_loss, preference_loss
from lmstack.align.preference_data import Pair, Unpaired, to_unpaired
from lmstack.align.steps import Stepper, batches, chunks
from lmstack.errors import LmstackError
from lmstack.progress import BudgetBar
from lmstack.train.metrics import MetricsLogger


def adapters_disabled(model: nn.Module):
    """The context manager `lmstack.adapt.disable_adapters(model)`; a clear error if lmstack.adapt lacks it."""
    try:
        # lazy: guarded: the except ImportError below names what is missing
        from lmstack.adapt import disable_adapters
    except ImportError:
        raise LmstackError("reference='adapters' needs lmstack.adapt.disable_adapters, which this install does not "
                           "have; use reference='copy' or 'precomputed'") from None
    return disable_adapters(model)


class PreferenceTrainer:
    def __init__(self, policy: nn.Module, tokenizer, cfg: AlignConfig, reference: nn.Module | None = None,
                 reference_tokenizer=None, log: Callable[[str], None] = print):
        if cfg.method not in METHOD_LOSS and cfg.method != "kto":
            raise LmstackError(f"PreferenceTrainer trains dpo, cdpo, ipo or kto, not method={cfg.method!r}")
        self.policy, self.tok, self.cfg, self.log = policy, tokenizer, cfg, log
        self.device = next(policy.parameters()).device
        if reference_tokenizer is not None:
            check_same_tokenizer(tokenizer, reference_tokenizer)
        if reference is not None:
            check_same_vocab(policy, reference)
        if cfg.reference == "adapters":
            if reference is not None:
                raise LmstackError("reference='adapters' uses the policy itself; do not pass a reference model")
            adapters_disabled(policy)  # fail now, not at the first step, when lmstack.adapt is missing
            self.reference = None
        else:
            self.reference = reference if reference is not None else copy.deepcopy(policy)
            self.reference.requires_grad_(False).eval()
        self.average = cfg.method == "ipo" and cfg.ipo_average
        self._ids: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._ref_cache: dict[tuple[str, str], float] | None = {} if cfg.reference == "precomputed" else None

    # ---- log-probs ----------------------------------------------------------------------------------
    def _encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        key = (prompt, completion)
        if key not in self._ids:
            self._ids[key] = encode_pair(self.tok, prompt, completion, self.cfg.template)
        return self._ids[key]

    def _batch(self, texts: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        return collate([self._encode(p, c) for p, c in texts], self.tok.pad_id, self.cfg.max_len, self.device)

    @torch.no_grad()
    def _reference_logps(self, texts: Sequence[tuple[str, str]], batch: dict | None = None) -> torch.Tensor:
        if self._ref_cache is not None and all(t in self._ref_cache for t in texts):
            return torch.tensor([self._ref_cache[t] for t in texts], device=self.device)
        batch = batch if batch is not None else self._batch(texts)
        if self.reference is None and self.cfg.reference == "precomputed":
            missing = next(t for t in texts if t not in self._ref_cache)
            raise LmstackError(f"no precomputed reference log-prob for prompt {missing[0][:60]!r}; the reference copy "
                               "was dropped after precompute_reference, so score every text up front")
        if self.reference is None:
            with adapters_disabled(self.policy):
                return sequence_logprobs(self.policy, batch, self.average)
        return sequence_logprobs(self.reference, batch, self.average)

    @torch.no_grad()
    def precompute_reference(self, texts: Sequence[tuple[str, str]], batch_size: int = 32) -> int:
        """Fill the reference log-prob cache for these (prompt, completion) texts; with reference='precomputed'
        the reference copy is dropped afterwards. Returns the number of texts cached."""
        if self._ref_cache is None:
            raise LmstackError("precompute_reference needs reference='precomputed'")
        todo = list(dict.fromkeys(t for t in texts if t not in self._ref_cache))
        for part in chunks(todo, batch_size):
            for t, v in zip(part, self._reference_logps(part).tolist()):
                self._ref_cache[t] = v
        return len(todo)

    def _drop_reference_copy(self) -> None:
        self.reference = None if self.cfg.reference == "precomputed" else self.reference

    # ---- losses -------------------------------------------------------------------------------------
    def paired_loss(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        texts = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        batch = self._batch(texts)
        # The reference goes first: nothing it does (an adapters-off switch) can touch the policy's graph.
        ref = self._reference_logps(texts, batch)
        logps = sequence_logprobs(self.policy, batch, self.average)
        n = len(pairs)
        conf = torch.tensor([p.confidence for p in pairs], device=self.device)
        mode = self.cfg.confidence_as
        eps: Any = self.cfg.label_smoothing
        if mode == "smoothing" and bool((conf < 1).any()):
            eps = torch.clamp(eps + (1 - conf), max=0.499)  # a pair's doubt adds to the global smoothing
        weights = conf if mode == "weight" else None
        # (IPO has no label smoothing: there only the "weight" mode changes anything.)
        out = preference_loss(METHOD_LOSS[self.cfg.method], logps[:n], logps[n:], ref[:n], ref[n:], self.cfg.beta,
                              eps, weights)
        if self.cfg.rpo_alpha:
            # RPO: NLL per chosen token over the batch (TRL's rpo_alpha). With IPO's averaged log-probs the rows are
            # already per-token means, so they are averaged rather than re-divided.
            tokens = batch["completion_mask"][:n, 1:].sum(-1).clamp(min=1).to(logps)
            chosen = logps[:n] if not self.average else logps[:n] * tokens
            out["nll"] = -chosen.sum() / tokens.sum()
            out["loss"] = out["loss"] + self.cfg.rpo_alpha * out["nll"]
        return out

    def unpaired_loss(self, rows: Sequence[Unpaired]) -> dict[str, torch.Tensor]:
        texts = [(r.prompt, r.completion) for r in rows]
        batch = self._batch(texts)
        # KTO's reference point: completions paired with the *next* row's prompt (mismatched), as TRL does;
        # it is not differentiated. Reference and no-grad passes run before the policy's graph is built.
        kl_policy = kl_ref = torch.zeros(0, device=self.device)
        if len(rows) > 1:
            mismatched = [(rows[(i + 1) % len(rows)].prompt, r.completion) for i, r in enumerate(rows)]
            with torch.no_grad():
                kl_batch = self._batch(mismatched)
                kl_ref = self._reference_logps(mismatched, kl_batch)
                kl_policy = sequence_logprobs(self.policy, kl_batch)
        ref = self._reference_logps(texts, batch)
        logps = sequence_logprobs(self.policy, batch)
        desirable = torch.tensor([r.label for r in rows], device=self.device)
        return kto_loss(logps, ref, desirable, kl_policy, kl_ref, self.cfg.beta, self.cfg.kto_desirable_weight,
                        self.cfg.kto_undesirable_weight)

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, pairs: Sequence[Pair], batch_size: int = 16) -> dict[str, float]:
        """Implicit-reward preference accuracy, margin and chosen/rejected rewards on held-out pairs."""
        if not pairs:
            return {}
        was = self.policy.training
        self.policy.eval()
        rc, rr = [], []
        for part in chunks(list(pairs), batch_size):
            texts = [(p.prompt, p.chosen) for p in part] + [(p.prompt, p.rejected) for p in part]
            batch = self._batch(texts)
            avg = self.average
            diff = sequence_logprobs(self.policy, batch, avg) - self._reference_logps(texts, batch)
            rc.append(self.cfg.beta * diff[:len(part)])
            rr.append(self.cfg.beta * diff[len(part):])
        self.policy.train(was)
        c, r = torch.cat(rc), torch.cat(rr)
        return {"accuracy": float((c > r).float().mean()), "margin": float((c - r).mean()),
                "chosen_reward": float(c.mean()), "rejected_reward": float(r.mean()), "n_pairs": len(pairs)}

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self, train: Sequence[Pair | Unpaired], val: Sequence[Pair] = (), out_dir: str | Path | None = None
            ) -> dict[str, Any]:
        """Train for cfg.train.steps steps. Paired methods take Pairs; KTO takes Unpaired rows or Pairs (split in
        two)."""

        cfg = self.cfg
        kto = cfg.method == "kto"
        if not train:
            raise LmstackError("no training rows")
        if kto and isinstance(train[0], Pair):
            train = to_unpaired(train)
        if not kto and not isinstance(train[0], Pair):
            raise LmstackError(f"method={cfg.method!r} trains on pairs (prompt, chosen, rejected); got unpaired rows")
        if self._ref_cache is not None:
            texts = [(p.prompt, c) for p in list(train) + list(val) for c in (p.chosen, p.rejected)]
            n = self.precompute_reference(texts)
            self.log(f"precomputed reference log-probs of {n} texts; dropped the reference copy")
            self._drop_reference_copy()
        stepper = Stepper.from_config(self.policy, cfg)
        metrics = MetricsLogger(out_dir, log=cfg.log, model=self.policy) if out_dir else None
        before = self.evaluate(val)
        history, bar, start = [], None, time.perf_counter()
        if cfg.train.progress:  # total and ETA follow whichever of steps / max_seconds ends the run

            bar = BudgetBar(cfg.train.steps, max_seconds=cfg.train.max_seconds, desc=cfg.method)
        self.policy.train()
        done = 0
        for step, rows in zip(range(cfg.train.steps), batches(train, cfg.batch_size, cfg.train.seed)):
            if cfg.train.max_seconds and time.perf_counter() - start > cfg.train.max_seconds:
                self.log(f"{cfg.method}: time budget of {cfg.train.max_seconds:.0f} s reached after {step} steps")
                break
            done = step + 1
            out = self.unpaired_loss(rows) if kto else self.paired_loss(rows)
            stats = stepper.step(out["loss"], step)
            row = {"loss": float(out["loss"].detach()), "accuracy": float(out["accuracy"]), **stats}
            row.update(_mean("chosen_reward", out["chosen_rewards"]), **_mean("rejected_reward",
                                                                              out["rejected_rewards"]))
            if "margins" in out:
                row["margin"] = float(out["margins"].mean())
            if kto:
                row["kl"] = float(out["kl"])
            if "nll" in out:
                row["nll"] = float(out["nll"].detach())
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                history.append({"step": step + 1, **row})
                if metrics:
                    metrics.log(step + 1, row)
            every = cfg.train.eval_every
            if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps and val and metrics:
                metrics.log(step + 1, {f"val_{k}": v for k, v in self.evaluate(val).items()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
        if bar is not None:
            bar.close()
        after = self.evaluate(val)
        if metrics:
            metrics.log(done, {f"val_{k}": v for k, v in after.items()})
            metrics.close()
        if val:
            self.log(f"{cfg.method}: held-out preference accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
                     f"margin {before['margin']:.3f} -> {after['margin']:.3f}")
        return {"method": cfg.method, "steps": done, "train_seconds": time.perf_counter() - start,
                "train_rows": len(train), "val_pairs": len(val), "val_before": before, "val_after": after,
                "history": history}


def _mean(name: str, x: torch.Tensor) -> dict[str, float]:
    return {name: float(x.mean())} if x.numel() else {}

