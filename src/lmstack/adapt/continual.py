"""Continual learning: keep task A while training on task B, with EWC and a replay buffer.

EWC (Kirkpatrick et al. 2017) treats the weights learned on A as a Gaussian posterior with diagonal precision
F (the Fisher information) and adds its negative log-density to B's loss:

    penalty = lam / 2 * sum_i F_i * (theta_i - theta_A_i)^2

so weights that mattered for A (large F_i) are held near their A values and the rest are free. F is the
*empirical* diagonal Fisher: the mean over A's examples of the squared gradient of each example's loss
(gradients taken one example at a time, as the definition asks; one batch-mean gradient squared would shrink F
by the batch size). `consolidate` folds a further task in (online EWC: F <- gamma F + F_new, anchor moves).

Replay (experience replay, e.g. Rolnick et al. 2019) keeps a fixed-size reservoir sample of earlier examples
and mixes a share of them into each later task's data. Reservoir sampling gives every example seen so far the
same chance to be in the buffer, whatever the stream length.

Scoring what was kept must use items that neither method saw again: replay retrains on its buffer and the
Fisher is computed on its own set, so an A item in either would flatter that method. `holdout_split` sets aside
A's score items first (every copy of an item on the same side, by content) and `continual_sets` draws the Fisher
set and the replay buffer from the rest only. benchmarks/continual.py trains a tiny model on world task A then
task B and reports A's accuracy on those held-out items, before/after, with neither, EWC, replay and both.

Usage:
    ewc = EWC.from_examples(model, examples_a, loss_fn, lam=500.0)     # after training on A
    objective = WithPenalty(SFTObjective(), ewc.penalty)                # the Trainer's objective for B
    buf = ReplayBuffer(capacity=200, seed=0); buf.add(examples_a)
    data_b = with_replay(examples_b, buf, ratio=0.25, seed=0)          # B plus 25% replayed A examples
    sets = continual_sets(examples_a, n_heldout=150, n_fisher=200, replay_capacity=200, key=lambda e: e.ids)
    sets.heldout, sets.fisher, sets.replay                              # disjoint from heldout by content
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
from torch import nn

from lmstack.errors import LmstackError


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                    ) -> dict[str, torch.Tensor]:
    """Mean squared gradient of loss_fn(model, batch) per trainable parameter, one batch at a time.

    Pass one example per batch for the empirical Fisher of the definition. The model's mode is restored;
    the gradients it had are left untouched."""
    params = _trainable(model)
    if not params:
        raise LmstackError("the model has no trainable parameters to compute a Fisher for")
    saved = {n: (p.grad.clone() if p.grad is not None else None) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout noise in the curvature estimate
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise LmstackError(f"the loss is {float(loss)} on Fisher batch #{count}; cannot estimate the Fisher")
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
        count += 1
    if count == 0:
        raise LmstackError("no batches given to estimate the Fisher")
    for n, p in params.items():
        p.grad = saved[n]
    model.train(was_training)
    return {n: f / count for n, f in fisher.items()}


class EWC:
    """Elastic weight consolidation around an anchor (the weights after the previous task)."""

    def __init__(self, model: nn.Module, fisher: dict[str, torch.Tensor], lam: float = 100.0):
        if not lam >= 0:
            raise LmstackError(f"EWC lam={lam} must be >= 0")
        params = _trainable(model)
        missing = [n for n in fisher if n not in params]
        if missing:
            raise LmstackError(f"the Fisher names parameters the model does not train, e.g. {missing[0]!r}")
        self.lam = float(lam)
        self.fisher = {n: f.detach().to(params[n].device) for n, f in fisher.items()}
        self.anchor = {n: params[n].detach().clone() for n in fisher}

    @classmethod
    def from_examples(cls, model: nn.Module, batches: Iterable[Any], loss_fn: Callable, lam: float = 100.0) -> "EWC":
        return cls(model, diagonal_fisher(model, batches, loss_fn), lam)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """lam / 2 * sum F (theta - anchor)^2, a scalar on the model's device (differentiable)."""
        params = dict(model.named_parameters())
        total = None
        for n, f in self.fisher.items():
            term = (f * (params[n].float() - self.anchor[n].float()) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.lam * total

    def consolidate(self, model: nn.Module, fisher: dict[str, torch.Tensor], gamma: float = 1.0) -> None:
        """Online EWC after one more task: F <- gamma F + F_new, anchor <- current weights."""
        params = _trainable(model)
        for n, f in fisher.items():
            old = self.fisher.get(n)
            self.fisher[n] = f.detach().to(params[n].device) + (gamma * old if old is not None else 0)
            self.anchor[n] = params[n].detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "fisher": dict(self.fisher), "anchor": dict(self.anchor)}


class WithPenalty:
    """An objective plus a regulariser: loss(model, batch) = objective.loss(...) + penalty(model)."""

    def __init__(self, objective, penalty: Callable[[nn.Module], torch.Tensor]):
        self.objective, self.penalty = objective, penalty

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.objective.loss(model, batch)
        extra = self.penalty(model).to(loss)
        metrics["penalty"] = float(extra.detach())
        return loss + extra, metrics

    def __getattr__(self, name: str):  # logits(), use_doc_ids, ... of the wrapped objective
        return getattr(self.objective, name)


class ReplayBuffer:
    """A fixed-capacity reservoir sample (Vitter's algorithm R) of every item added so far, seeded."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise LmstackError(f"replay capacity={capacity} must be >= 1")
        self.capacity = capacity
        self.items: list[Any] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, items: Iterable[Any]) -> None:
        for item in items:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                j = self.rng.randrange(self.seen)  # keep the new item with probability capacity / seen
                if j < self.capacity:
                    self.items[j] = item

    def sample(self, k: int) -> list[Any]:
        """k items, without repeats while the buffer has enough, with repeats beyond."""
        if not self.items:
            return []
        out: list[Any] = []
        while len(out) < k:
            out.extend(self.rng.sample(self.items, min(k - len(out), len(self.items))))
        return out

    def __len__(self) -> int:
        return len(self.items)


def with_replay(new: Sequence[Any], buffer: ReplayBuffer, ratio: float = 0.25, seed: int = 0) -> list[Any]:
    """The new task's examples plus round(ratio * len(new)) replayed ones, shuffled together."""
    if ratio < 0:
        raise LmstackError(f"replay ratio={ratio} must be >= 0")
    mixed = list(new) + buffer.sample(int(round(ratio * len(new))))
    random.Random(seed).shuffle(mixed)
    return mixed


def _content_key(item: Any) -> Hashable:
    ids = getattr(item, "ids", None)  # an SFTExample: its tokens are its content
    return tuple(ids) if ids is not None else repr(item)


def holdout_split(items: Sequence[Any], n_heldout: int, seed: int = 0,
                  key: Callable[[Any], Any] = _content_key) -> tuple[list[Any], list[Any]]:
    """(rest, heldout): a seeded choice of n_heldout items, where items with the same content (key) always
    fall on the same side, so no copy of a held-out item remains in the rest."""
    groups: dict[Hashable, list[Any]] = {}
    for item in items:
        k = key(item)
        groups.setdefault(tuple(k) if isinstance(k, list) else k, []).append(item)
    order = list(groups)
    random.Random(seed).shuffle(order)
    if not 0 <= n_heldout <= len(items):
        raise LmstackError(f"n_heldout={n_heldout} must be in [0, {len(items)}] (the number of items)")
    rest, heldout = [], []
    for k in order:
        (heldout if len(heldout) < n_heldout else rest).extend(groups[k])
    return rest, heldout


@dataclass
class ContinualSets:
    """Task A's items for a continual-learning run: what is scored, what the Fisher sees, what is replayed."""

    heldout: list[Any]
    fisher: list[Any]
    replay: ReplayBuffer
    rest: list[Any]


def continual_sets(items: Sequence[Any], n_heldout: int, n_fisher: int, replay_capacity: int, seed: int = 0,
                   key: Callable[[Any], Any] = _content_key) -> ContinualSets:
    """Held-out score items first; the Fisher set (the first n_fisher of a seeded shuffle) and the replay
    reservoir are drawn from the remaining items only, so neither holds a held-out item (by content)."""
    rest, heldout = holdout_split(items, n_heldout, seed, key)
    shuffled = list(rest)
    random.Random(seed + 1).shuffle(shuffled)
    buffer = ReplayBuffer(replay_capacity, seed=seed)
    buffer.add(rest)
    return ContinualSets(heldout=heldout, fisher=shuffled[:n_fisher], replay=buffer, rest=rest)
