"""HyperNetwork adaptation (HyperFormer, Mahabadi et al. 2021): one small network writes LoRA weights per task.

A task id picks a learned task embedding; each adapted Linear has a learned module embedding. A
shared trunk maps [task; module] to a hidden vector, and one pair of heads per Linear shape turns
it into that Linear's LoRA factors A (r x in) and B (out x r). So one model serves n_tasks tasks
with one set of weights, and tasks share what they have in common through the trunk. The B head
starts at zero (B = 0 for every task), so a new hypernetwork is an exact no-op, as LoRA is.

The task is an attribute: `model.hyper.task` is an int (the whole batch) or a LongTensor (B,)
(one task per row, for mixed batches); `use_task(model, t)` sets it for a `with` block.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    from lmstack.adapt.hyper import use_task
    model = get_peft_model(model, AdapterConfig(method="hyper", n_tasks=3, target_modules=["q_proj", "v_proj"]))
    with use_task(model, 2):
        logits = model(idx)
    with use_task(model, torch.tensor([0, 2])):          # a batch of two rows, two tasks
        logits = model(idx2)
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from lmstack.adapt.hooks import Switchable, ensure_sync
from lmstack.adapt.registry import find_targets, register_method
from lmstack.errors import LmstackError

HIDDEN = 32
"""Width of the hypernetwork's trunk (AdapterConfig has no field for it yet)."""


class HyperLoRA(Switchable):
    """Task embedding + module embedding -> trunk -> per-shape heads -> LoRA factors of each target."""

    def __init__(self, shapes: list[tuple[int, int]], n_tasks: int, emb_dim: int, r: int, scale: float,
                 hidden: int = HIDDEN):
        super().__init__()
        self.n_tasks, self.r, self.scale = n_tasks, r, scale
        self.shapes = shapes
        self.task_emb = nn.Embedding(n_tasks, emb_dim)
        self.module_emb = nn.Embedding(len(shapes), emb_dim)
        nn.init.normal_(self.task_emb.weight, std=1.0)
        nn.init.normal_(self.module_emb.weight, std=1.0)
        self.trunk = nn.Sequential(nn.Linear(2 * emb_dim, hidden), nn.ReLU())
        self.heads_a, self.heads_b = nn.ModuleDict(), nn.ModuleDict()
        for d_in, d_out in sorted(set(shapes)):
            key = f"{d_in}x{d_out}"
            self.heads_a[key] = nn.Linear(hidden, r * d_in)
            self.heads_b[key] = nn.Linear(hidden, d_out * r)
            nn.init.zeros_(self.heads_b[key].weight)
            nn.init.zeros_(self.heads_b[key].bias)
        self.task: int | torch.Tensor = 0
        self.adapter_name = "default"

    @property
    def names(self) -> list[str]:
        return [self.adapter_name]

    def delete(self, name: str) -> None:
        """One hypernetwork serves every task, so deleting it switches it off for good (its hooks stay no-ops)."""
        if name == self.adapter_name:
            self.disabled = True

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors of target i for the current task: A (n, r, in), B (n, out, r), n = 1 or batch."""
        task = self.task
        if not torch.is_tensor(task):
            task = torch.tensor([int(task)])
        task = task.to(self.task_emb.weight.device).reshape(-1)
        if int(task.min()) < 0 or int(task.max()) >= self.n_tasks:
            raise LmstackError(f"task id(s) {task.tolist()} out of range; the hypernetwork serves n_tasks={self.n_tasks}")
        z = torch.cat((self.task_emb(task), self.module_emb.weight[i].expand(len(task), -1)), dim=-1)
        h = self.trunk(z)
        d_in, d_out = self.shapes[i]
        key = f"{d_in}x{d_out}"
        a = self.heads_a[key](h).view(-1, self.r, d_in)
        b = self.heads_b[key](h).view(-1, d_out, self.r)
        return a, b

    def hook(self, i: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        """Forward hook of target i (bound with functools.partial, so copy.deepcopy rebinds it)."""
        if not self.acting():
            return None
        x = args[0]
        a, b = self.factors(i)
        if a.shape[0] != 1 and a.shape[0] != x.shape[0]:
            raise LmstackError(f"{a.shape[0]} task ids were set for a batch of {x.shape[0]} rows")
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
        low = torch.einsum("bti,nri->btr", x3, a) if a.shape[0] == 1 else torch.einsum("bti,bri->btr", x3, a)
        delta = torch.einsum("btr,nor->bto", low, b) if b.shape[0] == 1 else torch.einsum("btr,bor->bto", low, b)
        return out + self.scale * delta.reshape(*shape[:-1], -1).to(out.dtype)


def count_hyper_params(shapes: list[tuple[int, int]], cfg, hidden: int = HIDDEN) -> int:
    e, r = cfg.task_embedding_dim, cfg.r
    n = cfg.n_tasks * e + len(shapes) * e + 2 * e * hidden + hidden
    for d_in, d_out in set(shapes):
        n += hidden * r * d_in + r * d_in + hidden * d_out * r + d_out * r
    return n


@register_method("hyper")
def add_hyper(model: nn.Module, cfg, adapter_name: str) -> None:
    """Add a hypernetwork that writes LoRA weights for cfg.target_modules, for cfg.n_tasks tasks."""
    if getattr(model, "hyper", None) is not None:
        raise LmstackError("the model already has a hypernetwork; one hypernetwork serves all tasks "
                           "(raise n_tasks instead of adding a second)")
    names = find_targets(model, cfg.target_modules)
    modules = dict(model.named_modules())
    shapes = [(modules[n].in_features, modules[n].out_features) for n in names]
    ensure_sync(model)
    ref = next(model.parameters())
    hyper = HyperLoRA(shapes, cfg.n_tasks, cfg.task_embedding_dim, cfg.r, cfg.scale).to(ref.device, ref.dtype)
    hyper.adapter_name = adapter_name
    hyper.target_names = names
    model.hyper = hyper
    for i, name in enumerate(names):
        modules[name].register_forward_hook(partial(hyper.hook, i))


@contextmanager
def use_task(model: nn.Module, task: int | torch.Tensor):
    """Run the `with` block with the hypernetwork set to task id(s) `task`; restores the previous task."""
    hyper = getattr(model, "hyper", None)
    if hyper is None:
        raise LmstackError("the model has no hypernetwork; add one with AdapterConfig(method='hyper')")
    previous, hyper.task = hyper.task, task
    try:
        yield model
    finally:
        hyper.task = previous

