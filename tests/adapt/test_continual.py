"""EWC (diagonal Fisher, penalty, its effect on which weights move) and the reservoir replay buffer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmstack.adapt.continual import EWC, ReplayBuffer, WithPenalty, diagonal_fisher, with_replay
from lmstack.errors import LmstackError


def _mse(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum()


def test_fisher_is_the_mean_squared_per_example_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    xs, ys = torch.randn(8, 1, 3), torch.randn(8, 1, 1)
    fisher = diagonal_fisher(model, list(zip(xs, ys)), _mse)
    w = model.weight.detach()
    # d/dw 0.5 (w.x - y)^2 = (w.x - y) x, squared and averaged over the examples
    expected = torch.stack([((x @ w.T - y) * x) ** 2 for x, y in zip(xs, ys)]).mean(0)
    assert torch.allclose(fisher["weight"], expected.reshape(1, 3), atol=1e-6)
    assert model.weight.grad is None  # the model's own gradients are left as they were


def test_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it():
    model = nn.Linear(2, 1, bias=False)
    ewc = EWC(model, {"weight": torch.tensor([[4.0, 0.0]])}, lam=2.0)
    assert float(ewc.penalty(model).detach()) == 0.0
    with torch.no_grad():
        model.weight += torch.tensor([[0.5, 10.0]])
    # lam/2 * (4 * 0.5^2 + 0 * 10^2) = 1.0: the weight with no Fisher moves freely
    assert float(ewc.penalty(model).detach()) == pytest.approx(1.0)
    with pytest.raises(LmstackError, match="lam=-1"):
        EWC(model, {}, lam=-1)
    with pytest.raises(LmstackError, match="does not train"):
        EWC(model, {"nope": torch.zeros(1)})


def _train(model, data, steps, penalty=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = sum(_mse(model, b) for b in data) / len(data)
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_ewc_keeps_task_a_while_learning_task_b():
    # Task A only needs input 0, task B only input 1 but its targets also pull weight 0 the wrong way.
    # (A's targets are noisy: at a perfect fit every per-example gradient, and so the empirical Fisher, is 0)
    torch.manual_seed(0)
    xa = [torch.tensor([[1.0, 0.0]]) * s for s in (1.0, -1.0, 2.0, 0.5)]
    task_a = [(x, x @ torch.tensor([[2.0], [0.0]]) + n) for x, n in zip(xa, (0.3, 0.3, -0.3, -0.3))]
    xb = [torch.tensor([[0.5, 1.0]]) * s for s in (1.0, -1.0, 2.0)]
    task_b = [(x, x @ torch.tensor([[-1.0], [3.0]])) for x in xb]
    losses = {}
    for use_ewc in (False, True):
        model = nn.Linear(2, 1, bias=False)
        nn.init.zeros_(model.weight)
        _train(model, task_a, 200)
        a_before = float(sum(_mse(model, b) for b in task_a).detach())
        ewc = EWC.from_examples(model, task_a, _mse, lam=50.0)
        _train(model, task_b, 300, ewc.penalty if use_ewc else None)
        with torch.no_grad():
            losses[use_ewc] = (a_before, float(sum(_mse(model, b) for b in task_a)),
                               float(sum(_mse(model, b) for b in task_b)))
    assert losses[False][0] < 0.5 and losses[True][0] < 0.5
    assert losses[False][1] > 1.0                      # plain training on B forgets A
    assert losses[True][1] < 0.2 * losses[False][1]    # EWC keeps most of A
    assert losses[True][2] < 1e-3                      # and B is still learned (along the direction A leaves free)


def test_with_penalty_adds_the_regulariser():
    class Obj:
        def loss(self, model, batch):
            return model(batch).sum(), {"loss": 0.0}
    model = nn.Linear(2, 1)
    wrapped = WithPenalty(Obj(), lambda m: torch.tensor(3.0))
    loss, metrics = wrapped.loss(model, torch.zeros(1, 2))
    assert float(loss.detach()) == pytest.approx(float(model.bias.detach()) + 3.0) and metrics["penalty"] == 3.0


def test_reservoir_keeps_a_uniform_sample():
    hits = torch.zeros(100)
    for seed in range(400):
        buf = ReplayBuffer(10, seed=seed)
        buf.add(range(100))
        assert len(buf) == 10 and buf.seen == 100
        hits[list(buf.items)] += 1
    # each item should be kept with probability 10/100: 40 of 400 runs on average
    first, last = hits[:50].mean(), hits[50:].mean()
    assert 34 < float(first) < 46 and 34 < float(last) < 46
    a, b = ReplayBuffer(5, seed=1), ReplayBuffer(5, seed=1)
    a.add(range(50)), b.add(range(50))
    assert a.items == b.items and a.sample(3) == b.sample(3)
    with pytest.raises(LmstackError, match="capacity"):
        ReplayBuffer(0)


def test_with_replay_mixes_the_right_share():
    buf = ReplayBuffer(20, seed=0)
    buf.add(f"old{i}" for i in range(100))
    mixed = with_replay([f"new{i}" for i in range(40)], buf, ratio=0.25, seed=0)
    assert len(mixed) == 50 and sum(x.startswith("old") for x in mixed) == 10
    assert len(with_replay(["x"], ReplayBuffer(3), ratio=1.0)) == 1  # an empty buffer adds nothing
