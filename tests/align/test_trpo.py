"""TRPO: conjugate gradient on Fisher-vector products, and a line search that never accepts a step over max_kl."""
import copy
import json

import pytest
import torch
from align_helpers import letter_e, make_policy

from lmstack.align.config import AlignConfig
from lmstack.align.logprobs import collate, encode_pair
from lmstack.align.trpo import (TRPOTrainer, completion_logits, conjugate_gradient, fisher_vector_product, mean_kl,
                                trpo_update)
from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model, save_model


def test_cg_solves_a_known_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x, residual = conjugate_gradient(lambda v: a @ v, b, iters=8)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    assert residual < 1e-6
    with pytest.raises(LmstackError, match="positive"):
        conjugate_gradient(lambda v: -v, b, iters=3)


def test_fisher_vector_product_and_cg_on_a_categorical_policy():
    """For π = softmax(θ) the Fisher is diag(p) - p pᵀ; double backprop of the KL must give exactly that."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -1.0, 0.5, 2.0, 0.0, -0.4], dtype=torch.float64))
    p = torch.softmax(theta.detach(), -1)
    fisher = torch.diag(p) - torch.outer(p, p)
    damping = 0.1
    kl = mean_kl(torch.log_softmax(theta.detach(), -1)[None], theta[None], torch.ones(1, dtype=torch.float64))
    fvp = fisher_vector_product(kl, [theta], damping)
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.5], dtype=torch.float64)
    assert torch.allclose(fvp(v), fisher @ v + damping * v, atol=1e-12)
    grad = torch.tensor([0.2, -0.1, 0.4, -0.3, 0.05, 0.0], dtype=torch.float64)
    x, _ = conjugate_gradient(fvp, grad, iters=6)
    assert torch.allclose(x, torch.linalg.solve(fisher + damping * torch.eye(6, dtype=torch.float64), grad), atol=1e-5)


def _batch(tok, records):
    rows = [encode_pair(tok, r["messages"][0]["content"] if "messages" in r else r["prompt"], c)
            for r in records[:4] for c in ("2 + 3 = 5\n#### 5", "the answer is 7")]
    return collate(rows, tok.pad_id)


def _kl_between(old, new, batch):
    with torch.no_grad():
        lo, _, where = completion_logits(old, batch)
        ln, _, _ = completion_logits(new, batch)
        return float(mean_kl(torch.log_softmax(lo, -1), ln, torch.ones(lo.shape[0])))


@pytest.mark.parametrize("max_kl,seed", [(0.01, 0), (0.001, 1), (0.05, 2)])
def test_every_accepted_step_is_inside_the_trust_region(tok, records, max_kl, seed):
    policy = make_policy(tok, seed=seed)
    batch = _batch(tok, records)
    start = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1, generator=g)
    mask = batch["completion_mask"][:, 1:].float()
    stats = trpo_update(policy, batch, adv * mask, mask, max_kl=max_kl, cg_iters=10)
    assert stats["accepted"] == 1.0 and stats["surrogate_gain"] > 0
    measured = _kl_between(start, policy, batch)  # recomputed outside trpo_update, from the two models
    assert 0 < measured <= max_kl * (1 + 1e-4)
    assert measured == pytest.approx(stats["kl"], rel=1e-3)
    # the quadratic model sized the full step to max_kl, so few halvings are needed at these sizes
    assert stats["backtracks"] <= 3


def test_no_signal_means_no_step(tok, records):
    policy = make_policy(tok)
    before = copy.deepcopy(policy.state_dict())
    batch = _batch(tok, records)
    mask = batch["completion_mask"][:, 1:].float()
    stats = trpo_update(policy, batch, torch.zeros_like(mask), mask, max_kl=0.01)
    assert stats["accepted"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_trainer_keeps_every_accepted_step_under_max_kl(tok, records):
    policy = make_policy(tok)
    start = copy.deepcopy(policy)
    cfg = AlignConfig(method="trpo", group_size=4, prompts_per_step=2, max_tokens=8, max_kl=0.02, kl_coef=0.05,
                      eval_prompts=0, train={"steps": 3, "progress": False, "device": "cpu"}, optim={"lr": 1e-3},
                      schedule={"warmup_steps": 0})
    summary = TRPOTrainer(policy, tok, cfg, letter_e).fit(records)
    hist = summary["history"]
    accepted = [h for h in hist if h.get("trpo_accepted") == 1.0]
    assert accepted, hist
    assert all(h["step_kl"] <= cfg.max_kl for h in hist)
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), start.state_dict().values()))
    assert summary["optimizer_steps"] == 3  # the critic's Adam steps (ppo_epochs x minibatches per RL step)


def test_cli_method_trpo(tok, world, tmp_path):
    policy_dir = tmp_path / "policy"
    save_model(make_policy(tok), policy_dir, tokenizer=tok)
    recs = [r for r in world.corpus("chat") if r["kind"] == "arithmetic"][:10]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    out = tmp_path / "trpo"
    flags = ["align", "--method", "trpo", "--model", str(policy_dir), "--data", str(prompts), "--out", str(out),
             "--train.steps", "2", "--group_size", "2", "--prompts_per_step", "2", "--max_tokens", "6",
             "--reward", "math=1,format=0.5", "--max_kl", "0.02", "--cg_iters", "5", "--eval_prompts", "2",
             "--val_fraction", "0.2",
             "--train.progress", "false"]
    assert main(flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "trpo" and summary["eval_after"]["n"] == 2
    assert all(h["step_kl"] <= 0.02 for h in summary["history"] if "step_kl" in h)
    assert load_model(out / "model").config.vocab_size == tok.vocab_size
    assert main(flags[:-2] + ["--max_kl", "0", "--train.progress", "false"]) == 2
