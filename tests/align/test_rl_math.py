"""Hand-worked checks of the online-RL maths: KL estimators, KL control, TRL's PPO reward, GAE, whitening,
clipped PPO objectives, GRPO/RLOO baselines and NaN masking."""
import math

import pytest
import torch

from lmstack.align.rl_math import (AdaptiveKLController, FixedKLController, gae, group_advantages, group_stats,
                                   kl_estimate, kl_penalized_rewards, masked_mean, ppo_policy_loss, ppo_value_loss,
                                   rloo_advantages, whiten)
from lmstack.errors import LmstackError


def test_kl_estimators_by_hand():
    # π(a) = 0.5, π_ref(a) = 0.25: log r = log(0.25 / 0.5) = -log 2
    lp, lq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert float(kl_estimate(lp, lq, "k1")) == pytest.approx(math.log(2))              # 0.693147
    assert float(kl_estimate(lp, lq, "k2")) == pytest.approx(0.5 * math.log(2) ** 2)   # 0.240227
    assert float(kl_estimate(lp, lq, "k3")) == pytest.approx(0.5 - 1 + math.log(2))    # 0.193147
    with pytest.raises(LmstackError, match="k1, k2, k3"):
        kl_estimate(lp, lq, "k4")


def test_k1_and_k3_are_unbiased_and_k3_is_never_negative():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    exact = float((p * (p / q).log()).sum())                                           # 0.2773
    a = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[a], q.log()[a]
    assert float(kl_estimate(lp, lq, "k1").mean()) == pytest.approx(exact, abs=0.01)
    k3 = kl_estimate(lp, lq, "k3")
    assert float(k3.mean()) == pytest.approx(exact, abs=0.01)
    assert float(k3.min()) >= 0 and float(kl_estimate(lp, lq, "k1").min()) < 0


def test_adaptive_kl_controller_follows_ziegler():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    # KL 9 overshoots by 50%, clipped to +20%: β *= 1 + 0.2 · 256 / 10000 = 1.00512
    assert c.update(9.0, 256) == pytest.approx(0.2 * 1.00512)
    # KL 6.6: error +0.1 -> β *= 1.00256
    assert c.update(6.6, 256) == pytest.approx(0.2 * 1.00512 * 1.00256)
    # KL 3: error -50% clipped to -20% -> β *= 0.99488
    assert c.update(3.0, 256) == pytest.approx(0.2 * 1.00512 * 1.00256 * 0.99488)
    assert FixedKLController(0.05).update(100.0, 256) == 0.05
    with pytest.raises(LmstackError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # k1 = logp - ref = [[0.5, 0, -0.5], [0, -1, (pad)]]; reward = -0.1 · k1, + score at the last real token
    rewards, kl = kl_penalized_rewards(torch.tensor([1.0, 2.0]), logps, ref, mask, kl_coef=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 0.05 + 1.0])
    assert rewards.tolist()[1] == pytest.approx([0.0, 0.1 + 2.0, 0.0])
    assert kl.tolist()[1] == pytest.approx([0.0, -1.0, 0.0])


def test_gae_hand_worked():
    # γ = 1, λ = 0.5; rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    # δ2 = 1 - 0.7 = 0.3                A2 = 0.3
    # δ1 = 0 + 0.7 - 0.6 = 0.1          A1 = 0.1 + 0.5 · 0.3  = 0.25
    # δ0 = 0 + 0.6 - 0.5 = 0.1          A0 = 0.1 + 0.5 · 0.25 = 0.225
    # Row 2 has a pad at t=2 (value 9 there is garbage and must not leak):
    # δ1 = 1 - 0.4 = 0.6 (episode ends) A1 = 0.6;  δ0 = 0.4 - 0.2 = 0.2, A0 = 0.2 + 0.5 · 0.6 = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert adv.tolist()[1] == pytest.approx([0.5, 0.6, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])
    assert ret.tolist()[1] == pytest.approx([0.7, 1.0, 0.0])
    # λ = 1, γ = 1 with zero values: the advantage is the reward-to-go (Monte Carlo)
    adv, _ = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), torch.ones(1, 3), 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([6.0, 5.0, 3.0])


def test_whitening():
    # mean 2.5, unbiased var 5/3: (x - 2.5) / 1.2909944
    out = whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert out.tolist() == pytest.approx([-1.161895, -0.387298, 0.387298, 1.161895], abs=1e-5)
    # the masked-out 100 neither shifts the statistics nor survives: mean 2, var 1
    out = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0]))
    assert out.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-5)
    out = whiten(torch.tensor([1.0, 2.0, 3.0]), shift_mean=False)
    assert out.tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-5)   # (x-2)/1 + 2
    assert float(masked_mean(torch.tensor([1.0, 5.0]), torch.tensor([0, 0]))) == 0.0


def test_ppo_clipped_policy_objective():
    # ratios [1.5, 0.5, 1.1], advantages [1, 1, -1], ε = 0.2:
    # t0: max(-1.5, -1.2) = -1.2 (clipped)  t1: max(-0.5, -0.8) = -0.5  t2: max(1.1, 1.1) = 1.1
    logps = torch.log(torch.tensor([1.5, 0.5, 1.1])).unsqueeze(0)
    loss, stats = ppo_policy_loss(logps, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), 0.2)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    # the clipped token passes no gradient
    lp = logps.clone().requires_grad_()
    ppo_policy_loss(lp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), 0.2)[0].backward()
    assert float(lp.grad[0, 0]) == 0.0 and float(lp.grad[0, 1]) != 0.0


def test_ppo_clipped_value_objective():
    # v=[1, 0], v_old=[0.5, 0.5], R=[2, 0]: clipped [0.7, 0.3]; max((1-2)², (0.7-2)²)=1.69, max(0, 0.09)=0.09
    loss, stats = ppo_value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]),
                                 torch.ones(1, 2), clip=0.2)
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert stats["vf_clipfrac"] == 1.0


def test_grpo_group_advantages():
    # group 1: mean 0.75, unbiased std 0.5 -> (r - 0.75) / (0.5 + 1e-4); group 2 is flat -> 0
    adv, valid = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    s = 0.5 + 1e-4
    assert adv.tolist() == pytest.approx([0.25 / s, -0.75 / s, 0.25 / s, 0.25 / s, 0, 0, 0, 0], abs=1e-6)
    assert valid.all()
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 4, scale=False)
    assert adv.tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25])
    with pytest.raises(LmstackError, match="divisible"):
        group_advantages(torch.ones(5), 4)


def test_rloo_leave_one_out():
    # baselines (3 - r_i) / 3: [2/3, 1, 2/3, 2/3] -> advantages [1/3, -1, 1/3, 1/3]
    adv, valid = rloo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 4)
    assert adv.tolist() == pytest.approx([1 / 3, -1.0, 1 / 3, 1 / 3])
    assert valid.all()


def test_nan_reward_is_masked_from_its_group_and_does_not_poison_the_batch():
    clean_other_group = torch.tensor([0.0, 3.0, 1.0, 2.0])
    rewards = torch.cat([torch.tensor([1.0, float("nan"), 0.0, 1.0]), clean_other_group])
    # GRPO: finite [1, 0, 1]: mean 2/3, unbiased std sqrt(1/3) = 0.5773503
    adv, valid = group_advantages(rewards, 4)
    s = math.sqrt(1 / 3) + 1e-4
    assert adv[:4].tolist() == pytest.approx([(1 / 3) / s, 0.0, (-2 / 3) / s, (1 / 3) / s], abs=1e-6)
    assert valid.tolist() == [True, False, True, True] + [True] * 4
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[4:], group_advantages(clean_other_group, 4)[0])   # other group untouched
    # RLOO: finite total 2 over 3 samples: baselines [(2-1)/2, -, (2-0)/2, (2-1)/2] -> [0.5, 0, -1, 0.5]
    adv, valid = rloo_advantages(rewards, 4)
    assert adv[:4].tolist() == pytest.approx([0.5, 0.0, -1.0, 0.5])
    assert torch.isfinite(adv).all() and valid.tolist()[:4] == [True, False, True, True]
    # a group with a single finite reward has no baseline: all zero, all invalid
    adv, valid = group_advantages(torch.tensor([float("nan"), 2.0, float("nan"), float("nan")]), 4)
    assert adv.tolist() == [0.0] * 4 and not valid.any()
    stats = group_stats(rewards, 4)
    assert stats["nan_fraction"] == pytest.approx(1 / 8) and stats["flat_group_fraction"] == 0.0
    assert stats["reward_mean"] == pytest.approx((2 + 6) / 7)


def test_score_lands_on_the_last_generated_token_after_a_prompt():
    """Completions that start after a prompt (the logprobs layout) get their score on their own last token."""
    from lmstack.align.rl_math import kl_penalized_rewards

    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    zeros = torch.zeros(2, 6)
    rewards, _ = kl_penalized_rewards(torch.tensor([2.0, -1.0]), zeros, zeros, mask, kl_coef=0.1)
    assert rewards[0].tolist() == [0, 0, 0, 0, 2.0, 0] and rewards[1].tolist() == [0, 0, -1.0, 0, 0, 0]
