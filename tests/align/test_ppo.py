"""PPO-RLHF: value head layout, one step end to end, NaN masking, the KL controller, learning, the KL plot."""
import math

import pytest
import torch

from align_helpers import letter_e, make_policy
from lmstack.align.config import AlignConfig
from lmstack.align.logprobs import token_logprobs
from lmstack.align.ppo import PPOTrainer, ValueHead, logps_and_values, plot_kl_per_step
from lmstack.align.rl_math import kl_k1, kl_k3
from lmstack.align.rollout import sample, to_batch
from lmstack.model.hf_io import save_model


def _cfg(**kw):
    base = dict(method="ppo", group_size=4, prompts_per_step=2, max_tokens=8, eval_prompts=0, kl_coef=0.05,
                train={"steps": 2, "progress": False, "device": "cpu"}, optim={"lr": 1e-3},
                schedule={"warmup_steps": 0})
    for nested in ("train", "optim", "schedule"):  # a test's nested keys override the helper's, key by key
        kw[nested] = {**base[nested], **kw.get(nested, {})}
    return AlignConfig(**{**base, **kw})


def test_logps_and_values_share_one_forward_and_the_token_layout(policy, tok, records):
    ro = sample(policy, tok, records[:2], n=2, max_new_tokens=5, seed=0)
    batch = to_batch(ro, tok)
    head = ValueHead(policy.config.d_model)
    torch.nn.init.normal_(head.proj.weight)
    logps, values = logps_and_values(policy, head, batch)
    assert torch.allclose(logps, token_logprobs(policy, batch), atol=1e-6)
    on = batch["completion_mask"][:, 1:].bool()
    assert values.shape == logps.shape and bool((values[~on] == 0).all()) and bool((values[on] != 0).all())
    # values[:, t] reads the hidden state that emits token t + 1, the same position the log-prob is scored at
    hidden = policy(batch["input_ids"], return_hidden=True)
    assert torch.allclose(values[on], head(hidden[:, :-1])[on], atol=1e-6)
    _, _, entropy = logps_and_values(policy, head, batch, with_entropy=True)
    logits = policy(batch["input_ids"])[:, :-1][on].float()
    exact = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy[on], exact, atol=1e-5) and bool((entropy[~on] == 0).all())


def test_one_step_moves_policy_and_value_and_saves_a_plain_model(policy, tok, records, tmp_path):
    before = [p.detach().clone() for p in policy.parameters()]
    trainer = PPOTrainer(policy, tok, _cfg(ppo_epochs=2, minibatches=2, train={"steps": 1}), letter_e)
    row = trainer.fit(records, [])["history"][0]
    for key in ("policy_loss", "value_loss", "kl", "clipfrac", "approx_kl", "vf_clipfrac", "entropy"):
        assert math.isfinite(row[key]), key
    assert trainer.opt_steps == 4 and bool(trainer.value_head.proj.weight.abs().sum() > 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    save_model(trainer.policy, tmp_path / "m", tokenizer=tok)
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert not any("value" in n for n in names)


def test_nan_scores_are_masked(policy, tok, records):
    calls = {"n": 0}

    def half_nan(p, c, r):
        calls["n"] += 1
        return float("nan") if calls["n"] % 2 else 1.0

    row = PPOTrainer(policy, tok, _cfg(train={"steps": 1}), half_nan).fit(records, [])["history"][0]
    assert row["nan_fraction"] == pytest.approx(0.5) and row["nan_count"] == 4 and math.isfinite(row["policy_loss"])
    assert math.isfinite(row["kl"]) and math.isfinite(row["value_loss"]) and math.isfinite(row["reward_mean"])
    all_nan = PPOTrainer(make_policy(tok), tok, _cfg(train={"steps": 1}), lambda p, c, r: float("nan"))
    assert all_nan.fit(records, [])["history"][0]["skipped"] == 1.0 and all_nan.opt_steps == 0


def test_adaptive_controller_raises_beta_when_kl_overshoots(tok, records):
    # After every step β moves toward the target: up when that step's KL overshot it, down otherwise. (The
    # sampled k1 estimate can be negative on one batch, so the direction is checked step by step.)
    trainer = PPOTrainer(make_policy(tok), tok, _cfg(kl_target=0.05, kl_horizon=10, train={"steps": 6},
                                                     optim={"lr": 1e-2}), letter_e)
    hist = trainer.fit(records, [])["history"]
    coefs = [h["kl_coef"] for h in hist] + [trainer.kl_ctl.value]
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6) and coefs[1] < coefs[0]  # starts at the reference
    for h, now, nxt in zip(hist, coefs, coefs[1:]):
        assert (nxt > now) == (h["kl"] > 0.05), (h["kl"], now, nxt)
    assert any(h["kl"] > 0.05 for h in hist)  # the rising branch was exercised


def test_ppo_raises_a_learnable_reward(tok, records):
    torch.manual_seed(0)
    cfg = _cfg(group_size=8, prompts_per_step=2, max_tokens=12, kl_coef=0.0, train={"steps": 40}, optim={"lr": 1e-2})
    hist = PPOTrainer(make_policy(tok, seed=3), tok, cfg, letter_e).fit(records, [])["history"]
    first = sum(h["reward_mean"] for h in hist[:5]) / 5
    last = sum(h["reward_mean"] for h in hist[-5:]) / 5
    assert last > first + 0.06 and last > 1.8 * first, (first, last)


def test_k1_reward_is_the_kl_gradient_but_k3_reward_is_not():
    # Exact expectation over a 5-way categorical: E_π[k(a) ∇log π(a)] with k held fixed (a reward) equals
    # ∇KL(π||ref) for k1, but ∇KL(π||ref) + ∇E_ref[log π] for k3 -- why ppo.py recommends k1 as the penalty.
    g = torch.Generator().manual_seed(0)
    theta, ref = torch.randn(5, generator=g, requires_grad=True), torch.randn(5, generator=g).log_softmax(-1)

    def grad(fn):
        (out,) = torch.autograd.grad(fn(theta.log_softmax(-1)), theta)
        return out

    def reward_grad(k):
        return grad(lambda lp: (lp.exp() * k(lp.detach(), ref)).sum())

    kl = grad(lambda lp: (lp.exp() * (lp - ref)).sum())
    assert torch.allclose(reward_grad(kl_k1), kl, atol=1e-6)
    assert torch.allclose(reward_grad(kl_k3), kl + grad(lambda lp: (ref.exp() * lp).sum()), atol=1e-6)
    assert not torch.allclose(reward_grad(kl_k3), kl, atol=1e-3)


def test_kl_plot_writes_a_png(tmp_path):
    hist = [{"step": i + 1, "kl": 0.5 * i, "approx_kl": 0.01 * (i + 1)} for i in range(5)]
    path = plot_kl_per_step({"a": hist, "b": hist[:3]}, tmp_path / "kl.png", target=1.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))
    one = plot_kl_per_step({"a": hist}, tmp_path / "one.png", keys=("kl",), log_scale=False)
    assert one.stat().st_size > 1000
