"""DP-SGD for `lmstack finetune`: per-sample gradient clipping, Gaussian noise, Poisson sampling, and the epsilon
spent (the accountant is lmstack.safety.rdp).

One step (Abadi et al. 2016): every training row joins the batch independently with probability q = expected
batch / rows (Poisson sampling, the sampling the RDP accountant assumes, so the reported epsilon is honest; the
batch size varies, an empty batch is a noise-only step). Each sampled row's gradient g_i is clipped to norm C,
g_i * min(1, C / |g_i|); the clipped gradients are summed, N(0, sigma^2 C^2) noise is added to every coordinate,
and the sum is divided by the *expected* batch size (dividing by the actual size would leak it). The optimizer
then steps as usual. The privacy unit is one row, and with DP on the finetune run puts one conversation per row
(packing off), so the guarantee is per conversation. A secret repeated in k conversations is covered only by
group privacy (k * epsilon, with delta growing to k e^((k-1) epsilon) delta: weak for large k); the canary
benchmark measures what that leaves in practice.

Per-sample gradients: our own, with torch.func -- vmap(grad(loss of one row)) over the batch, on
functional_call of the model with only the trainable parameters passed in. Why not opacus' GradSampleModule:
it builds per-sample gradients from per-module hooks, so a weight used outside its own module's forward is
missed -- our tied LM head multiplies by tok_emb.weight directly (Transformer.head), and opacus would return the
embedding's per-sample gradient without the head's share -- and it wraps the model in a module tree that our
checkpoints and adapter files do not expect. torch.func differentiates the whole forward, so tied weights and
every adapter get_peft_model builds (LoRA, DoRA, IA3, prefix tensors) come out right with no per-layer rules; a
test checks it against an explicit loop over the samples, for full fine-tuning and for LoRA. Opacus is used only
as a second opinion on the accountant (tests).

Cost: per-sample gradients hold chunk x (trainable parameters) floats at once (chunk = --batch_size; the expected
batch is batch_size * train.grad_accum), which is why DP fine-tuning pairs well with LoRA. SDPA has no vmap
batching rule on CPU, so torch runs that one op row by row inside the vmap; the step-time overhead against a
plain step is measured in benchmarks/dp_canary.py.

The per-row loss is the mean cross-entropy over that row's assistant tokens (a row with none gives a zero
gradient). Not supported together with DP: fp16 loss scaling, packing (rows would mix records), MoE's auxiliary
loss (it is left out of the per-row loss), gradient-noise / spike-guard options (ignored). The noise comes from
torch's seeded generator, which is not a cryptographically secure RNG: fine for research, not for a release
that must withstand an attacker who can reconstruct the seed.

Usage:
    lmstack finetune --dp.epsilon 8 --dp.max_grad_norm 1.0 --data chat.jsonl --model base/ --out runs/dp
    from lmstack.safety.dp import DPConfig, DPSGD, PoissonLoader
    loader = PoissonLoader(packed, expected_batch=16, chunk=8, seed=0)
    dp = DPSGD.from_config(DPConfig(epsilon=8), rows=loader.n, expected_batch=16, steps=300)
    metrics = dp.privatize(model, next(loader), generator)    # sets every trainable p.grad; then optimizer.step()
    dp.epsilon_spent(300)
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Callable
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lmstack.errors import LmstackError
from lmstack.runtime.validation import check_number, need
from lmstack.safety.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_curve, sigma_for_epsilon


@dataclass
class DPConfig:
    epsilon: float = 0.0
    """Differential privacy budget: train with DP-SGD so the run spends at most this epsilon (0 = DP off)."""
    delta: float = 1e-5
    """The delta of (epsilon, delta)-DP; keep it well below 1 / (training conversations)."""
    max_grad_norm: float = 1.0
    """C: every conversation's gradient is clipped to this L2 norm before the noise is added."""
    noise_multiplier: float = 0.0
    """sigma: the noise std is sigma * C (0 = the smallest sigma that keeps the run within `epsilon`)."""

    def __post_init__(self) -> None:
        check_number("dp.epsilon", self.epsilon, low=0)
        check_number("dp.delta", self.delta, low=0, high=1, low_open=True, high_open=True)
        check_number("dp.max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        check_number("dp.noise_multiplier", self.noise_multiplier, low=0)
        need(math.isfinite(self.epsilon) and math.isfinite(self.noise_multiplier),
             f"dp.epsilon={self.epsilon} / dp.noise_multiplier={self.noise_multiplier} must be finite")

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0 or self.noise_multiplier > 0


class PoissonLoader:
    """Batches by Poisson sampling: each step every row joins independently with probability
    expected_batch / rows. The draw for step s comes from a generator seeded by (seed, s), so a resumed run
    draws exactly the batches an uninterrupted one would. `batch_size` is the chunk the per-sample gradients are
    computed in (memory), not the logical batch."""

    def __init__(self, packed: dict[str, torch.Tensor], expected_batch: int, chunk: int, seed: int = 0):
        self.packed, self.seed = packed, seed
        self.n = int(packed["input_ids"].shape[0])
        if not 1 <= expected_batch <= self.n:
            raise LmstackError(f"DP-SGD: an expected batch of {expected_batch} rows cannot be sampled from "
                               f"{self.n} training rows; lower batch_size * train.grad_accum or add data")
        self.expected_batch, self.batch_size = expected_batch, max(1, chunk)
        self.sample_rate = expected_batch / self.n
        self.draws = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
        self.draws += 1
        keep = torch.rand(self.n, generator=g) < self.sample_rate
        idx = keep.nonzero().flatten()
        return {k: v[idx] for k, v in self.packed.items()}

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = int(state["draws"])


# ---- per-sample gradients, clipping, noise
def row_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over one row's counted tokens; exactly 0 (with a zero gradient) when none counts.
    Written with a mask product instead of boolean indexing, whose data-dependent shape vmap cannot batch."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    m = loss_mask.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of what trains (tied tensors once): what DP-SGD privatizes."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def per_sample_grads(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                     loss_fn: Callable = row_loss) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: (B, *shape) per-row gradients}, (B,) per-row losses) by vmap(grad(one row's loss)); the model's
    other parameters and buffers stay as they are (functional_call replaces only `params`)."""
    detached = {k: v.detach() for k, v in params.items()}

    def one(p, ids, targets, mask):
        logits = functional_call(model, p, (ids.unsqueeze(0),), strict=False)[0]
        loss = loss_fn(logits, targets, mask)
        return loss, loss.detach()

    with warnings.catch_warnings():
        # SDPA has no vmap batching rule on CPU yet: torch loops over the rows for that one op and says so
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0, 0), randomness="different")(
            detached, batch["input_ids"], batch["targets"], batch["loss_mask"])
    return grads, losses


def clip_and_sum(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(sum over rows of g_i * min(1, C / |g_i|), (B,) the norms |g_i| before clipping), |g_i| over all tensors."""
    norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", scale.to(g.dtype), g) for k, g in grads.items()}, norms


class DPSGD:
    """The privatizing half of a DP-SGD step plus its accountant: privatize() turns a Poisson batch into the
    noisy clipped mean gradient in every trainable p.grad; epsilon_spent(steps) is the budget used so far."""

    def __init__(self, sigma: float, max_grad_norm: float, sample_rate: float, expected_batch: int,
                 delta: float, target_epsilon: float = 0.0):
        self.sigma, self.max_grad_norm, self.sample_rate = sigma, max_grad_norm, sample_rate
        self.expected_batch, self.delta, self.target_epsilon = expected_batch, delta, target_epsilon
        self._rdp = rdp_curve(sample_rate, sigma, DEFAULT_ORDERS) if sigma > 0 else None  # one step's curve

    @classmethod
    def from_config(cls, cfg: DPConfig, rows: int, expected_batch: int, steps: int) -> "DPSGD":
        """sigma from cfg (given, or the smallest that keeps `steps` steps within cfg.epsilon); a given sigma that
        would overspend cfg.epsilon is refused."""
        q = expected_batch / rows
        sigma = cfg.noise_multiplier or sigma_for_epsilon(cfg.epsilon, steps, q, cfg.delta)
        dp = cls(sigma, cfg.max_grad_norm, q, expected_batch, cfg.delta, cfg.epsilon)
        spent = dp.epsilon_spent(steps)
        if cfg.epsilon and spent > cfg.epsilon * 1.0001:
            raise LmstackError(f"dp.noise_multiplier={sigma} spends epsilon={spent:.4g} over {steps} steps at "
                               f"sample rate {q:.4g}, more than dp.epsilon={cfg.epsilon}; raise the noise "
                               f"multiplier or leave it 0 to derive it")
        return dp

    def epsilon_spent(self, steps: int) -> float:
        if steps == 0:
            return 0.0
        if self._rdp is None:
            return math.inf
        return epsilon_from_rdp(steps * self._rdp, self.delta, DEFAULT_ORDERS)[0]

    def privatize(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
                  chunk: int = 8, autocast=None) -> dict[str, float]:
        """Per-row gradients of `batch` (in chunks of `chunk` rows), clipped, summed, noised and divided by the
        expected batch size, written into each trainable parameter's .grad. Returns the step's metrics."""
        params = trainable_parameters(model)
        if not params:
            raise LmstackError("DP-SGD: the model has no trainable parameters")
        total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        losses, norms = [], []
        rows = int(batch["input_ids"].shape[0])
        for start in range(0, rows, chunk):
            part = {k: v[start:start + chunk] for k, v in batch.items()}
            with (autocast() if autocast is not None else _null()):
                grads, loss = per_sample_grads(model, params, part)
            summed, norm = clip_and_sum(grads, self.max_grad_norm)
            for k in total:
                total[k] += summed[k].float()
            losses.append(loss.detach().float().cpu())
            norms.append(norm.detach().cpu())
        std = self.sigma * self.max_grad_norm
        for k, p in params.items():
            # noise drawn on the CPU generator (seeded, saved in checkpoints), then moved: bit-exact resume
            noise = torch.randn(p.shape, generator=generator) * std if std else 0.0
            g = (total[k] + torch.as_tensor(noise).to(p.device)) / self.expected_batch
            p.grad = g.to(p.dtype)
        loss_all = torch.cat(losses) if losses else torch.zeros(0)
        norm_all = torch.cat(norms) if norms else torch.zeros(0)
        return {"loss": float(loss_all.mean()) if rows else math.nan, "batch_rows": float(rows),
                "per_sample_grad_norm": float(norm_all.mean()) if rows else 0.0,
                "clipped_frac": float((norm_all > self.max_grad_norm).float().mean()) if rows else 0.0}

    def report(self, steps: int) -> dict[str, Any]:
        return {"epsilon": self.epsilon_spent(steps), "delta": self.delta, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.sigma, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "expected_batch": self.expected_batch, "steps": steps,
                "sampling": "poisson", "accountant": "rdp (sampled Gaussian, Balle et al. 2020 conversion)"}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class DPTrainerMixin:
    """A Trainer whose step is DP-SGD: put it before the Trainer class (class T(DPTrainerMixin, SFTTrainer)) and
    set `.dp` (a DPSGD) before fit(). The Poisson loader gives the batch; there is no accumulation (grad_accum
    only sets the expected batch), no global clipping and no spike guard: the per-row clip is the clipping."""

    dp: DPSGD

    def train_step(self, progress: float) -> dict[str, float]:
        if self.precision.scaler is not None:
            raise LmstackError("DP-SGD does not support fp16 loss scaling; use --train.precision bf16 or fp32")
        mult = self.lr_at(progress)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        self.model.train()
        batch = {k: v.to(self.device) for k, v in next(self.train_loader).items()}
        m = self.dp.privatize(self.model, batch, self.noise_gen, chunk=self.train_loader.batch_size,
                              autocast=self.precision.autocast)
        gnorm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in self.params if p.grad is not None))
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = int(batch["lengths"].sum()) if "lengths" in batch else int(batch["input_ids"].numel())
        self.tokens_seen += tokens
        if self.ema is not None:
            self.ema.update(self.raw)
        loss = m["loss"] if math.isfinite(m["loss"]) else (self.loss_mean or 0.0)  # an empty Poisson batch
        self.loss_mean = loss if self.loss_mean is None else 0.9 * self.loss_mean + 0.1 * loss
        return {"loss": loss, "grad_norm": gnorm, "lr": self.optimizer.param_groups[0]["lr"], "tokens": tokens,
                "skipped": 0.0, "epsilon": self.dp.epsilon_spent(self.step), **{k: v for k, v in m.items()
                                                                               if k != "loss"}}


def start_dp(cfg: DPConfig, packed: dict[str, torch.Tensor], batch_size: int, grad_accum: int, steps: int,
             seed: int, log: Callable[[str], None] = print) -> tuple[PoissonLoader, DPSGD]:
    """The Poisson loader (expected batch = batch_size * grad_accum rows, gradients in chunks of batch_size)
    and the DPSGD whose sigma keeps `steps` steps within cfg.epsilon; logs the settings."""
    loader = PoissonLoader(packed, expected_batch=batch_size * grad_accum, chunk=batch_size, seed=seed)
    dp = DPSGD.from_config(cfg, loader.n, loader.expected_batch, steps)
    log(f"dp-sgd: {loader.n} rows (one conversation each), Poisson sample rate {loader.sample_rate:.4g} "
        f"(expected batch {loader.expected_batch}), clip C={cfg.max_grad_norm:g}, noise multiplier "
        f"sigma={dp.sigma:.4g}: epsilon {dp.epsilon_spent(steps):.3g} at delta={cfg.delta:g} after {steps} steps")
    return loader, dp


def finish_dp(dp: DPSGD, steps: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The privacy report of a finished run (for its summary), and the log line that states the epsilon spent."""
    report = dp.report(steps)
    log(f"dp-sgd: spent epsilon={report['epsilon']:.4g} at delta={report['delta']:g} over {steps} steps "
        f"(sigma={dp.sigma:.4g}, C={dp.max_grad_norm:g}, sample rate {dp.sample_rate:.4g}; RDP accountant)")
    return report
