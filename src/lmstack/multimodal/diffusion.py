"""Denoising diffusion (Ho et al. 2020) with DDIM sampling (Song et al. 2021) and classifier-free guidance
(Ho & Salimans 2022), independent of the denoiser: a model is any eps_fn(x_t, t) -> predicted noise.

The forward chain q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) has the closed form
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), abar_t = prod_{s<=t} (1 - beta_s): q_sample draws from it, and
the training loss is the MSE between the true noise and the model's prediction at a uniformly drawn t.

Samplers (both predict x_0 from eps, optionally clip it to [-1, 1], and recompute eps from the clipped x_0, so
the two agree exactly where the maths says they should):
- ddpm_sample: ancestral sampling from the posterior q(x_{t-1} | x_t, x_0) with its variance beta~_t. With fewer
  steps than T it runs on the respaced chain (Nichol & Dhariwal 2021): abar kept at the chosen timesteps and
  beta'_k = 1 - abar_k / abar_{k-1}.
- ddim_sample: x_{t'} = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z with
  sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t'): eta=0 is deterministic, eta=1 over
  all T steps is DDPM's update.
- guided(cond, uncond, w): eps_uncond + w (eps_cond - eps_uncond), one batched call; w=1 is the conditional model.

Usage:
    from lmstack.multimodal.diffusion import NoiseSchedule, diffusion_loss, ddpm_sample, ddim_sample, guided
    sched = NoiseSchedule("cosine", 1000)
    loss = diffusion_loss(lambda x, t: model(x, t, cond), x0, sched, generator=g)
    x = ddim_sample(lambda x, t: model(x, t, cond), (4, 3, 32, 32), sched, steps=25, generator=g)
    x = ddpm_sample(eps_fn, shape, sched, steps=100, generator=g)        # ancestral, respaced to 100 steps
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError

SCHEDULES = ("linear", "cosine")
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beta_schedule(kind: str, timesteps: int) -> torch.Tensor:
    """(T,) float64 betas: 'linear' (DDPM: 1e-4 .. 0.02 scaled to T) or 'cosine' (Nichol & Dhariwal, capped 0.999)."""
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
        raise LmstackError(f"timesteps must be an integer >= 2, got {timesteps!r}")
    if kind == "linear":
        scale = 1000 / timesteps  # keeps abar_T near zero whatever T is
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise LmstackError(f"unknown beta schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")


class NoiseSchedule:
    """betas, alphas and their cumulative product abar for T steps (float64 for the sampler's coefficients)."""

    def __init__(self, kind: str = "cosine", timesteps: int = 1000):
        self.kind, self.timesteps = kind, timesteps
        self.betas = beta_schedule(kind, timesteps)
        self.alphas = 1 - self.betas
        self.abar = torch.cumprod(self.alphas, dim=0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t (B,) integer steps in 0..T-1."""
        a = self.abar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def timesteps_for(self, steps: int | None) -> list[int]:
        """The decreasing timesteps a `steps`-step sampler visits (evenly spaced, always ending at 0)."""
        steps = self.timesteps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.timesteps:
            raise LmstackError(f"steps must be an integer in 1..{self.timesteps} (the schedule's T), got {steps!r}")
        ts = torch.linspace(0, self.timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
        return sorted(set(ts), reverse=True)


def diffusion_loss(eps_fn: EpsFn, x0: torch.Tensor, sched: NoiseSchedule,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The simple epsilon-prediction loss: MSE(eps, eps_fn(q_sample(x0, t, eps), t)), t uniform in 0..T-1."""
    t = torch.randint(0, sched.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return F.mse_loss(eps_fn(sched.q_sample(x0, t, noise), t), noise)


def _x0_eps(eps_fn: EpsFn, x: torch.Tensor, t: int, abar_t: float, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted x0, eps consistent with it) at step t; clipping x0 to the pixel range recomputes eps."""
    eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    return x0, eps


def _noise(shape, generator, like: torch.Tensor) -> torch.Tensor:
    # drawn on the CPU generator, then moved: the same seed gives the same sample on any device
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, shape: tuple, sched: NoiseSchedule, steps: int | None = None,
                generator: torch.Generator | None = None, clip: bool = True, device: str | torch.device = "cpu",
                x_t: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling: x_{t-1} ~ N(posterior mean, beta~_t I) on the (respaced) chain; returns x_0."""
    ts = sched.timesteps_for(steps)
    x = _noise(shape, generator, torch.empty(0, device=device)) if x_t is None else x_t
    for i, t in enumerate(ts):
        abar_t = float(sched.abar[t])
        abar_prev = float(sched.abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        beta = 1 - abar_t / abar_prev  # the respaced chain's beta (= betas[t] when every step is visited)
        x0, _ = _x0_eps(eps_fn, x, t, abar_t, clip)
        c0 = math.sqrt(abar_prev) * beta / (1 - abar_t)
        ct = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)
        x = c0 * x0 + ct * x
        if i + 1 < len(ts):
            var = beta * (1 - abar_prev) / (1 - abar_t)
            x = x + math.sqrt(var) * _noise(shape, generator, x)
    return x


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, shape: tuple, sched: NoiseSchedule, steps: int | None = 50, eta: float = 0.0,
                generator: torch.Generator | None = None, clip: bool = True, device: str | torch.device = "cpu",
                x_t: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM: deterministic for eta=0, any number of steps; eta>0 adds the fraction eta of DDPM's noise."""
    if not 0.0 <= float(eta) <= 1.0:
        raise LmstackError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM's variance), got {eta!r}")
    ts = sched.timesteps_for(steps)
    x = _noise(shape, generator, torch.empty(0, device=device)) if x_t is None else x_t
    for i, t in enumerate(ts):
        abar_t = float(sched.abar[t])
        abar_prev = float(sched.abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0, eps = _x0_eps(eps_fn, x, t, abar_t, clip)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise(shape, generator, x)
    return x


def guided(eps_cond_uncond: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
           w: float) -> EpsFn:
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond). `eps_cond_uncond(x, t)` returns both
    (one batched forward); w=1 returns the conditional prediction itself, w=0 the unconditional one."""
    if not math.isfinite(float(w)) or w < 0:
        raise LmstackError(f"guidance scale must be a finite number >= 0, got {w!r}")

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = eps_cond_uncond(x, t)
        return uncond + w * (cond - uncond)
    return eps_fn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) steps -> (B, dim) sinusoidal features (cos half, sin half), as in DDPM and DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
