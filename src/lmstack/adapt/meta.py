"""Meta-learning an initialisation for few-shot fine-tuning: Reptile and first-order MAML.

Both look for weights from which a few gradient steps on a handful of examples of a *new* task go
far. Each meta-step draws tasks; for each task a copy of the weights is fine-tuned for inner_steps
on a support batch (the "inner loop"), and the meta-gradient says how to move the shared weights:

- Reptile (Nichol et al. 2018): meta-gradient = theta - theta'_task, averaged over tasks; with SGD
  at meta_lr = eps this is theta <- theta + eps (mean theta' - theta). eps is annealed to 0.
- First-order MAML (Finn et al. 2017, FOMAML): meta-gradient = the query-batch loss gradient at the
  adapted weights theta', i.e. MAML with the second-order term dropped; applied with Adam.

ALGORITHMS is the registry (name -> meta-gradient function, meta optimizer, default meta lr). Any
module and loss work: a Task hands out batches and `loss_fn(model, batch)` scores them; only
parameters with requires_grad take part, so a PEFT model meta-learns just its adapter.

Tasks from the synthetic world: world_qa_tasks makes one task per person attribute (birth_city,
hobby, ...): "Question: ...\\nAnswer:" prompts with the loss on the answer tokens only.

Usage:
    tasks = world_qa_tasks(World(seed=0, n_people=100), tok, ["birth_city", "university"])
    meta_train(model, tasks, MetaConfig(algorithm="reptile", meta_steps=200), answer_loss)
    scores = few_shot_eval(model, held_out_task, answer_loss, k_shot=8, steps=(0, 5, 10))
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.runtime.validation import check_choice


@dataclass
class MetaConfig:
    algorithm: str = "reptile"
    """Meta-learning algorithm, a key of ALGORITHMS: reptile | fomaml."""
    meta_steps: int = 100
    """Number of meta-updates."""
    tasks_per_step: int = 4
    """Tasks averaged into one meta-update (the meta-batch)."""
    inner_steps: int = 5
    """Fine-tuning steps on each task's support batch."""
    inner_lr: float = 1e-3
    """Learning rate of the inner loop (and of few-shot fine-tuning, which should match it)."""
    inner_optimizer: str = "adam"
    """Inner-loop optimizer: adam (fresh state per task, as in the Reptile paper) or sgd."""
    meta_lr: float | None = None
    """Meta learning rate; None = the algorithm's default (reptile: eps 1.0 annealed to 0; fomaml: Adam 1e-3)."""
    support_size: int = 8
    """Examples per support batch (the 'shots')."""
    query_size: int = 8
    """Examples per query batch (FOMAML's outer loss)."""
    seed: int = 0
    """Seed for drawing tasks and examples."""

    def __post_init__(self) -> None:
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        for name in ("meta_steps", "tasks_per_step", "inner_steps", "support_size", "query_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed; it must be an integer >= 1")
        for name in ("inner_lr", "meta_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value!r} is not allowed; it must be a number > 0")


class Task:
    """A few-shot task: a name, and a pool of examples turned into batches by `collate`."""

    def __init__(self, name: str, examples: list, collate: Callable[[list], object]):
        if not examples:
            raise LmstackError(f"task {name!r} has no examples")
        self.name, self.examples, self.collate = name, examples, collate

    def sample(self, n: int, rng: random.Random) -> object:
        return self.collate(rng.sample(self.examples, min(n, len(self.examples))))

    def split(self, n: int, seed: int = 0) -> tuple["Task", "Task"]:
        """(n examples, the rest), disjoint: a support pool and a query pool."""
        rows = list(self.examples)
        random.Random(seed).shuffle(rows)
        return Task(self.name, rows[:n], self.collate), Task(self.name, rows[n:], self.collate)


# ---- inner loop
INNER_OPTIMIZERS = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999)),  # beta1=0: Reptile's choice
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LmstackError("the model has no trainable parameters to meta-learn")
    return params


def adapt(model: nn.Module, batch, loss_fn, steps: int, lr: float, optimizer: str = "adam") -> list[float]:
    """Fine-tune `model` in place for `steps` steps on one batch (few-shot); returns the losses seen."""
    opt = INNER_OPTIMIZERS[optimizer](trainable(model), lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- meta-gradients: each returns one tensor per trainable parameter, at the weights it started from
def reptile_grad(model, task: Task, loss_fn, cfg: MetaConfig, rng: random.Random) -> list[torch.Tensor]:
    params = trainable(model)
    start = [p.detach().clone() for p in params]
    adapt(model, task.sample(cfg.support_size, rng), loss_fn, cfg.inner_steps, cfg.inner_lr, cfg.inner_optimizer)
    return [s - p.detach() for s, p in zip(start, params)]


def fomaml_grad(model, task: Task, loss_fn, cfg: MetaConfig, rng: random.Random) -> list[torch.Tensor]:
    adapt(model, task.sample(cfg.support_size, rng), loss_fn, cfg.inner_steps, cfg.inner_lr, cfg.inner_optimizer)
    params = trainable(model)
    loss = loss_fn(model, task.sample(cfg.query_size, rng))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# name -> (meta-gradient, meta optimizer, default meta lr, anneal the meta lr linearly to 0)
ALGORITHMS = {
    "reptile": (reptile_grad, "sgd", 1.0, True),
    "fomaml": (fomaml_grad, "adam", 1e-3, False),
}


def meta_train(model: nn.Module, tasks: list[Task], cfg: MetaConfig, loss_fn, log=None) -> list[float]:
    """Meta-train the trainable parameters of `model` in place over `tasks`; returns the mean first inner
    loss of each meta-step (how well the current init does on a fresh support batch)."""
    if not tasks:
        raise LmstackError("meta_train needs at least one task")
    grad_fn, opt_name, default_lr, anneal = ALGORITHMS[cfg.algorithm]
    lr = cfg.meta_lr or default_lr
    params = trainable(model)
    meta_opt = torch.optim.SGD(params, lr=lr) if opt_name == "sgd" else torch.optim.Adam(params, lr=lr)
    rng = random.Random(cfg.seed)
    history = []
    for step in range(cfg.meta_steps):
        theta = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        first = []
        for _ in range(cfg.tasks_per_step):
            task = rng.choice(tasks)
            with torch.no_grad():
                first.append(loss_fn(model, task.sample(cfg.support_size, random.Random(rng.random()))).item())
            for acc, g in zip(total, grad_fn(model, task, loss_fn, cfg, rng)):
                acc.add_(g)
            with torch.no_grad():  # every task starts from the same weights
                for p, t in zip(params, theta):
                    p.copy_(t)
        for p, g in zip(params, total):
            p.grad = g / cfg.tasks_per_step
        if anneal:
            for group in meta_opt.param_groups:
                group["lr"] = lr * (1 - step / cfg.meta_steps)
        meta_opt.step()
        meta_opt.zero_grad(set_to_none=True)
        history.append(sum(first) / len(first))
        if log is not None and (step % max(1, cfg.meta_steps // 10) == 0 or step == cfg.meta_steps - 1):
            log(f"meta step {step}: support loss before adapting {history[-1]:.4f}")
    return history


# ---- synthetic-world QA tasks
def qa_collate(pad_id: int):
    """Batch of (prompt ids, answer ids) -> (idx, targets) with targets -100 except on the answer tokens."""
    def collate(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [p + a for p, a in rows]
        width = max(len(s) for s in seqs) - 1
        idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
        tgt = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, ((p, a), s) in enumerate(zip(rows, seqs)):
            idx[i, :len(s) - 1] = torch.tensor(s[:-1])
            tgt[i, len(p) - 1:len(s) - 1] = torch.tensor(a)  # position j predicts token j+1
        return idx, tgt
    return collate


def world_qa_tasks(world, tok, attributes: list[str] | None = None, split: str = "train") -> list[Task]:
    """One Task per person attribute of the world's QA corpus: prompt 'Question: q\\nAnswer:', answer ' a<eos>'."""
    rows = world.corpus("qa", split=split)
    known = sorted({r["attribute"] for r in rows})
    attributes = attributes or known
    unknown = [a for a in attributes if a not in known]
    if unknown:
        raise LmstackError(f"attributes {unknown} are not in the world's QA; known: {', '.join(known)}")
    eos = [tok.eos_id] if tok.eos_id is not None else []
    collate = qa_collate(tok.pad_id if tok.pad_id is not None else 0)
    tasks = []
    for attr in attributes:
        examples = [(tok.encode(f"Question: {r['question']}\nAnswer:"), tok.encode(" " + str(r["answer"])) + eos)
                    for r in rows if r["attribute"] == attr]
        tasks.append(Task(attr, examples, collate))
    return tasks


def answer_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy on the answer tokens (targets != -100), plus the MoE aux loss if any."""
    idx, tgt = batch
    loss = F.cross_entropy(model(idx).flatten(0, 1).float(), tgt.flatten(), ignore_index=-100)
    aux = getattr(model, "aux_loss", None)
    return loss + aux.to(loss) if torch.is_tensor(aux) else loss


@torch.no_grad()
def answer_scores(model: nn.Module, batch) -> dict[str, float]:
    """Teacher-forced answer loss, answer-token accuracy and exact match (every answer token right)."""
    idx, tgt = batch
    logits = model(idx).float()
    mask = tgt != -100
    loss = F.cross_entropy(logits[mask], tgt[mask]).item()
    right = (logits.argmax(-1) == tgt) | ~mask
    return {"loss": loss, "token_acc": float((logits.argmax(-1) == tgt)[mask].float().mean()),
            "exact": float(right.all(dim=1).float().mean())}


def few_shot_eval(model: nn.Module, task: Task, loss_fn, k_shot: int = 8, steps: tuple[int, ...] = (0, 5, 10),
                  lr: float = 1e-3, optimizer: str = "adam", trials: int = 3, query_size: int = 64,
                  seed: int = 0, score_fn=answer_scores) -> dict[int, dict[str, float]]:
    """Fine-tune on k_shot examples of `task` and score disjoint query examples after each of `steps`.

    Averaged over `trials` draws of the support set; the model's weights are restored afterwards."""
    params = trainable(model)
    theta = [p.detach().clone() for p in params]
    out: dict[int, dict[str, float]] = {s: {} for s in steps}
    for trial in range(trials):
        support_pool, query_pool = task.split(k_shot, seed=seed * 1000 + trial)
        support = support_pool.collate(support_pool.examples)
        query = query_pool.sample(query_size, random.Random(seed * 1000 + trial))
        done = 0
        opt = INNER_OPTIMIZERS[optimizer](params, lr)
        for s in sorted(steps):
            for _ in range(s - done):
                loss = loss_fn(model, support)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            done = s
            for key, value in score_fn(model, query).items():
                out[s][key] = out[s].get(key, 0.0) + value / trials
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        for p in params:
            p.grad = None
    return out
