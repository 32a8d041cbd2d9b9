"""DDPM / DDIM / classifier-free guidance maths (multimodal/diffusion.py), independent of any denoiser."""
import math

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.diffusion import (NoiseSchedule, beta_schedule, ddim_sample, ddpm_sample, diffusion_loss,
                                          guided)


def toy_eps(x, t):
    # a fixed, t-dependent, non-linear "denoiser": enough to make every coefficient of the samplers matter
    return torch.tanh(x * 0.7 + t.float().view(-1, 1, 1, 1) / 50.0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules(kind):
    betas = beta_schedule(kind, 1000)
    assert betas.shape == (1000,) and float(betas.min()) > 0 and float(betas.max()) <= 0.999
    abar = NoiseSchedule(kind, 1000).abar
    assert bool((abar[1:] < abar[:-1]).all()) and float(abar[0]) > 0.99 and float(abar[-1]) < 1e-3
    with pytest.raises(LmstackError, match="unknown beta schedule"):
        beta_schedule("sigmoid", 10)
    with pytest.raises(LmstackError, match="timesteps"):
        beta_schedule(kind, 1)


def test_q_sample_matches_the_forward_chain():
    """q(x_t | x_0) in closed form has the mean and variance of t steps of the chain x_s = sqrt(1-b) x + sqrt(b) z."""
    sched = NoiseSchedule("linear", 200)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.8, -0.5, 0.1]).repeat(8000, 1)  # 8000 draws of one 3-pixel "image"
    t = 60
    x = x0.clone().double()
    for s in range(t + 1):
        b = float(sched.betas[s])
        x = math.sqrt(1 - b) * x + math.sqrt(b) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    closed = sched.q_sample(x0, torch.full((x0.shape[0],), t), torch.randn(x0.shape, generator=g))
    abar = float(sched.abar[t])
    want_mean, want_var = math.sqrt(abar) * x0[0], 1 - abar
    for draws in (x.float(), closed):
        assert torch.allclose(draws.mean(0), want_mean, atol=0.04)
        assert torch.allclose(draws.var(0), torch.full((3,), want_var), atol=0.05)


def test_ddim_eta1_all_steps_equals_ddpm():
    sched = NoiseSchedule("cosine", 50)
    shape = (2, 3, 4, 4)
    a = ddpm_sample(toy_eps, shape, sched, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(toy_eps, shape, sched, steps=50, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-5)
    c = ddim_sample(toy_eps, shape, sched, steps=50, eta=0.0, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(a, c, atol=1e-2)  # eta=0 really is another sampler
    # respaced: DDPM on 10 of the 50 steps is DDIM eta=1 on the same 10
    a10 = ddpm_sample(toy_eps, shape, sched, steps=10, generator=torch.Generator().manual_seed(1))
    b10 = ddim_sample(toy_eps, shape, sched, steps=10, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a10, b10, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_seed_reproduces():
    sched = NoiseSchedule("linear", 100)
    x_t = torch.randn(2, 3, 4, 4)
    a = ddim_sample(toy_eps, x_t.shape, sched, steps=7, x_t=x_t, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(toy_eps, x_t.shape, sched, steps=7, x_t=x_t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # no noise beyond x_T
    s1 = ddpm_sample(toy_eps, (1, 3, 4, 4), sched, steps=20, generator=torch.Generator().manual_seed(9))
    s2 = ddpm_sample(toy_eps, (1, 3, 4, 4), sched, steps=20, generator=torch.Generator().manual_seed(9))
    s3 = ddpm_sample(toy_eps, (1, 3, 4, 4), sched, steps=20, generator=torch.Generator().manual_seed(10))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert float(s1.abs().max()) <= 1.0 + 1e-6  # x0 clipping keeps the last step in the pixel range
    assert sched.timesteps_for(7)[0] == 99 and sched.timesteps_for(7)[-1] == 0 and len(sched.timesteps_for(7)) == 7
    for bad in (0, 101, 2.5):
        with pytest.raises(LmstackError, match="steps"):
            sched.timesteps_for(bad)
    with pytest.raises(LmstackError, match="eta"):
        ddim_sample(toy_eps, (1, 3, 4, 4), sched, eta=1.5)


def test_ddim_recovers_x0_with_the_true_noise():
    """With the exact noise of a single x0 as the denoiser, DDIM (eta=0) returns that x0 in any number of steps."""
    sched = NoiseSchedule("cosine", 1000)
    x0 = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    x_t = torch.randn(1, 3, 4, 4)

    def oracle(x, t):
        a = sched.abar[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    for steps in (1, 10, 50):
        out = ddim_sample(oracle, x_t.shape, sched, steps=steps, x_t=x_t.clone())
        assert torch.allclose(out, x0, atol=2e-3)  # float32 at abar_T ~ 0


def test_cfg():
    cond = torch.randn(2, 3, 4, 4)
    uncond = torch.randn(2, 3, 4, 4)
    both = lambda x, t: (cond, uncond)  # noqa: E731
    x, t = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    assert torch.allclose(guided(both, 1.0)(x, t), cond, atol=1e-6)
    assert torch.allclose(guided(both, 0.0)(x, t), uncond)
    assert torch.allclose(guided(both, 3.0)(x, t), uncond + 3 * (cond - uncond))
    with pytest.raises(LmstackError, match="guidance"):
        guided(both, -1.0)


def test_loss_is_zero_for_the_true_noise_and_learns():
    sched = NoiseSchedule("linear", 100)
    x0 = torch.full((8, 3, 4, 4), 0.5)
    # a denoiser that knows x0 = 0.5 everywhere predicts the noise exactly
    exact = lambda x, t: (x - sched.abar[t].float().view(-1, 1, 1, 1).sqrt() * 0.5) / (  # noqa: E731
        1 - sched.abar[t].float().view(-1, 1, 1, 1)).sqrt()
    assert float(diffusion_loss(exact, x0, sched, torch.Generator().manual_seed(0))) < 1e-8
    zero = diffusion_loss(lambda x, t: torch.zeros_like(x), x0, sched, torch.Generator().manual_seed(0))
    assert 0.5 < float(zero) < 1.5  # the variance of unit noise
