"""Reptile and first-order MAML: exact one-step formulas, a toy task family where the meta-learned init adapts
far better than a plain init, and the synthetic-world QA tasks."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lmstack.adapt.meta import (MetaConfig, Task, adapt, answer_loss, few_shot_eval, meta_train, qa_collate,
                                world_qa_tasks)
from lmstack.config import ConfigError
from lmstack.errors import LmstackError


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def regression_tasks(n_tasks: int = 8, seed: int = 0) -> list[Task]:
    """Linear tasks y = w_t . x with w_t scattered around a shared w*: what they share is learnable."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(4, generator=g) * 3
    tasks = []
    for t in range(n_tasks):
        w = w_star + 0.3 * torch.randn(4, generator=g)
        xs = torch.randn(64, 4, generator=g)
        rows = [(x, (x @ w)[None]) for x in xs]
        tasks.append(Task(f"lin{t}", rows, lambda rows: (torch.stack([r[0] for r in rows]),
                                                         torch.stack([r[1] for r in rows]))))
    return tasks


def linear() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(m.weight)
    return m


def test_reptile_one_task_one_sgd_step_is_plain_sgd():
    task = regression_tasks(1)[0]
    model = linear()
    cfg = MetaConfig(algorithm="reptile", meta_steps=1, tasks_per_step=1, inner_steps=1, inner_lr=0.1,
                     inner_optimizer="sgd", meta_lr=1.0, support_size=8)
    batch = task.sample(8, _rng_after_first_draw(cfg, [task]))
    want = linear()
    want.weight.data -= 0.1 * torch.autograd.grad(mse(want, batch), want.weight)[0]
    meta_train(model, [task], cfg, mse)
    torch.testing.assert_close(model.weight, want.weight)


def _rng_after_first_draw(cfg: MetaConfig, tasks: list[Task]) -> random.Random:
    """The rng state meta_train has when the (single) task's support batch is drawn."""
    rng = random.Random(cfg.seed)
    rng.choice(tasks)
    rng.random()
    return rng


def test_fomaml_one_step_is_query_gradient_at_adapted_weights():
    task = regression_tasks(1)[0]
    model = linear()
    cfg = MetaConfig(algorithm="fomaml", meta_steps=1, tasks_per_step=1, inner_steps=1, inner_lr=0.1,
                     inner_optimizer="sgd", meta_lr=0.05, support_size=8, query_size=8)
    rng = _rng_after_first_draw(cfg, [task])
    support, query = task.sample(8, rng), task.sample(8, rng)
    w = torch.zeros(1, 4, requires_grad=True)
    w_adapted = (w - 0.1 * torch.autograd.grad(((support[0] @ w.T - support[1]) ** 2).mean(), w)[0]).detach()
    w_adapted.requires_grad_(True)
    g = torch.autograd.grad(((query[0] @ w_adapted.T - query[1]) ** 2).mean(), w_adapted)[0]
    want = -0.05 * torch.sign(g)  # Adam's first step moves each weight by lr * sign(g)
    meta_train(model, [task], cfg, mse)
    torch.testing.assert_close(model.weight, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algorithm,meta_lr", [("reptile", 1.0), ("fomaml", 0.3)])
def test_meta_init_adapts_better_on_a_new_task(algorithm, meta_lr):
    tasks = regression_tasks(9)
    train_tasks, new_task = tasks[:8], tasks[8]
    cfg = MetaConfig(algorithm=algorithm, meta_steps=60, tasks_per_step=4, inner_steps=3, inner_lr=0.05,
                     inner_optimizer="sgd", meta_lr=meta_lr, support_size=8)
    meta = linear()
    history = meta_train(meta, train_tasks, cfg, mse)
    assert history[-1] < 0.1 * history[0]

    def score(model, batch):
        return {"loss": mse(model, batch).item()}

    kw = dict(k_shot=4, steps=(0, 3), lr=0.05, optimizer="sgd", trials=3, query_size=32, score_fn=score)
    meta_init = meta.weight.detach().clone()
    from_meta = few_shot_eval(meta, new_task, mse, **kw)
    from_plain = few_shot_eval(linear(), new_task, mse, **kw)
    assert from_meta[3]["loss"] < 0.2 * from_plain[3]["loss"], (from_meta, from_plain)
    assert from_meta[3]["loss"] < from_meta[0]["loss"]  # the few steps do help
    assert torch.equal(meta.weight, meta_init)  # few_shot_eval restored the weights


def test_meta_config_errors():
    with pytest.raises(ConfigError, match="algorithm"):
        MetaConfig(algorithm="maml2")
    with pytest.raises(ConfigError, match="inner_steps"):
        MetaConfig(inner_steps=0)
    with pytest.raises(ConfigError, match="inner_optimizer"):
        MetaConfig(inner_optimizer="lbfgs")
    with pytest.raises(LmstackError, match="no trainable"):
        m = linear().requires_grad_(False)
        meta_train(m, regression_tasks(1), MetaConfig(meta_steps=1), mse)


def test_world_qa_tasks_mask_everything_but_the_answer():
    from lmstack.world import World
    from lmstack.tokenizer import train_tokenizer

    world = World(seed=0, n_people=12)
    rows = world.corpus("qa", split="train")
    tok = train_tokenizer(texts=[r["text"] for r in rows], type="bpe", vocab_size=300, show_progress=False,
                          special_tokens="chat")
    tasks = world_qa_tasks(world, tok, ["hobby", "birth_city"])
    assert [t.name for t in tasks] == ["hobby", "birth_city"]
    idx, tgt = tasks[0].sample(4, random.Random(0))
    for i in range(4):
        answer = tgt[i][tgt[i] != -100].tolist()
        assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]).strip() in {r["answer"] for r in rows}
    with pytest.raises(LmstackError, match="not in the world"):
        world_qa_tasks(world, tok, ["shoe_size"])

    from lmstack.model import Transformer
    from lmstack.model.presets import preset

    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4))
    before = answer_loss(model, (idx, tgt)).item()
    losses = adapt(model, (idx, tgt), answer_loss, steps=10, lr=1e-2)
    assert losses[0] == pytest.approx(before) and answer_loss(model, (idx, tgt)).item() < 0.7 * before
    history = meta_train(model, tasks, MetaConfig(meta_steps=2, tasks_per_step=2, inner_steps=2), answer_loss)
    assert len(history) == 2 and all(h == h for h in history)  # finite, no NaN


def test_qa_collate_targets_line_up():
    idx, tgt = qa_collate(pad_id=0)([([5, 6, 7], [8, 9]), ([5], [8])])
    assert idx.tolist() == [[5, 6, 7, 8], [5, 0, 0, 0]]
    assert tgt.tolist() == [[-100, -100, 8, 9], [8, -100, -100, -100]]
