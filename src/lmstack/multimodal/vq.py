"""Discrete image tokens (issue 24, XII.6): a small convolutional VQ-VAE whose quantizer is switchable between a
learned codebook (VQ-VAE, van den Oord et al. 2017) and a lookup-free quantizer (LFQ, MAGVIT-v2, Yu et al. 2023).

- `quantizer="vq"`: each latent vector of the encoder's h x w grid snaps to its nearest codebook row. Gradients
  pass straight through the snap; a commitment loss pulls the encoder towards its codes. The codebook follows the
  encoder by exponential moving averages of the vectors assigned to each code (ema_decay > 0; no codebook
  gradient then) or by its own gradient loss (ema_decay = 0). A code unused for `dead_after` steps restarts at a
  random encoder output of the batch, so the codebook does not collapse onto a few rows.
- `quantizer="lfq"`: no codebook at all. Each latent has log2(codebook_size) dims and the code is their signs
  read as bits. An entropy penalty (per-latent entropy low, batch-average code entropy high) makes the
  assignment confident and spreads it over the codes.

Equal code bits: both quantizers spend log2(codebook_size) bits per grid cell, so a model's `code_bits` is
h * w * log2(codebook_size), whichever quantizer it uses.

Usage:
    from lmstack.multimodal.vq import VQConfig, VQVAE, train_vq, codebook_stats, load_vq
    vq = VQVAE(VQConfig(image_size=32, quantizer="lfq", codebook_size=256))   # 8x8 grid of 8-bit codes
    train_vq(vq, pixels, steps=500)            # pixels (N, 3, 32, 32) in [-1, 1] (images.to_pixels)
    codes = vq.encode(pixels)                  # (N, 64) ints in [0, 256)
    recon = vq.decode(codes)                   # (N, 3, 32, 32); a code id outside the codebook raises
    codebook_stats(codes, 256)                 # {"usage": fraction of codes used, "perplexity": ...}
    vq.save("out/vq"); vq = load_vq("out/vq")  # vq_model.safetensors + vq_config.json
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lmstack.config import ConfigError, atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model.load_guard import load_safetensors, read_json

CONFIG_FILE, WEIGHTS_FILE = "vq_config.json", "vq_model.safetensors"
QUANTIZERS = ("vq", "lfq")


@dataclass
class VQConfig:
    image_size: int = 32
    """Side of the square input images in pixels; a multiple of 2**downsample."""
    hidden: int = 64
    """Channels of the convolutional encoder and decoder."""
    downsample: int = 2
    """Number of stride-2 convolutions: the code grid's side is image_size / 2**downsample."""
    quantizer: Literal["vq", "lfq"] = "vq"
    """vq: a learned codebook (nearest row); lfq: lookup-free, the signs of log2(codebook_size) latent dims."""
    codebook_size: int = 256
    """Number of distinct codes; a power of two (log2 of it is the bits per grid cell)."""
    code_dim: int = 16
    """Width of a codebook row (vq only; lfq's latent width is log2(codebook_size))."""
    commitment: float = 0.25
    """Weight of the commitment loss ||z - sg(q)||^2 that keeps the encoder near its codes."""
    ema_decay: float = 0.99
    """vq: codebook updated by moving averages at this decay; 0 learns the codebook by gradient instead."""
    dead_after: int = 50
    """vq: a code unused for this many training steps restarts at a random encoder output (0 = never)."""
    entropy_weight: float = 0.1
    """lfq: weight of the entropy penalty (per-latent entropy minus the batch's code entropy)."""
    entropy_temperature: float = 0.1
    """lfq: temperature of the soft code assignment the entropy penalty is computed from."""

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer={self.quantizer!r}; allowed: {', '.join(QUANTIZERS)}")
        k = self.codebook_size
        if not isinstance(k, int) or k < 2 or k & (k - 1):
            raise ConfigError(f"codebook_size={k!r} must be a power of two >= 2 (log2 of it is the bits per code)")
        if self.quantizer == "lfq" and k > 2 ** 14:
            raise ConfigError(f"codebook_size={k} is too big for lfq's exact entropy penalty; use <= 16384")
        if self.downsample < 1 or self.image_size % (2 ** self.downsample):
            raise ConfigError(f"image_size={self.image_size} must be a multiple of 2**downsample="
                              f"{2 ** self.downsample} (downsample >= 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.hidden < 1 or self.code_dim < 1 or self.dead_after < 0:
            raise ConfigError("hidden and code_dim must be >= 1 and dead_after >= 0")

    @property
    def bits(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** self.downsample

    @property
    def latent_dim(self) -> int:
        return self.code_dim if self.quantizer == "vq" else self.bits


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _encoder(cfg: VQConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    ch_in = 3
    for _ in range(cfg.downsample):
        layers += [nn.Conv2d(ch_in, cfg.hidden, 4, stride=2, padding=1), nn.ReLU()]
        ch_in = cfg.hidden
    layers += [nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1), ResBlock(cfg.hidden), nn.ReLU(),
               nn.Conv2d(cfg.hidden, cfg.latent_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: VQConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, cfg.hidden, 3, padding=1), ResBlock(cfg.hidden)]
    for i in range(cfg.downsample):
        last = i == cfg.downsample - 1
        layers += [nn.ReLU(), nn.ConvTranspose2d(cfg.hidden, 3 if last else cfg.hidden, 4, stride=2, padding=1)]
    return nn.Sequential(*layers)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row quantization with straight-through gradients, EMA updates and dead-code restarts."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.code_dim
        init = torch.randn(k, d) / math.sqrt(d)
        if cfg.ema_decay > 0:  # EMA: the codebook is state, not a parameter the optimizer moves
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(k))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("idle_steps", torch.zeros(k, dtype=torch.long))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        book = self.codebook.detach()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(1)[None]
        return dist.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (N, D, h, w) -> (quantized z with straight-through gradient, codes (N, h*w), quantizer loss)."""
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.nearest(flat.detach())
        q = self.lookup(codes)
        loss = self.cfg.commitment * F.mse_loss(flat, q.detach())
        if self.cfg.ema_decay == 0:
            loss = loss + F.mse_loss(q, flat.detach())  # the codebook loss: rows move to their vectors
        if self.training:
            self._update(flat.detach(), codes)
        q_st = flat + (q - flat).detach()
        return q_st.reshape(n, h, w, d).permute(0, 3, 1, 2), codes.reshape(n, h * w), loss

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        cfg, k = self.cfg, self.cfg.codebook_size
        counts = torch.bincount(codes, minlength=k).to(flat.dtype)
        if cfg.ema_decay > 0:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat)
            self.ema_count.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
            self.ema_sum.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
            # Laplace smoothing keeps a rarely used row from dividing by ~0 (Sonnet's VQ-VAE-EMA)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (total + k * 1e-5) * total
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self.idle_steps.add_(1)
        self.idle_steps[counts > 0] = 0
        if cfg.dead_after:
            dead = (self.idle_steps >= cfg.dead_after).nonzero().flatten()
            if len(dead):
                pick = torch.randint(0, flat.shape[0], (len(dead),), device=flat.device)
                self.codebook.data[dead] = flat[pick]
                if cfg.ema_decay > 0:
                    self.ema_sum[dead] = flat[pick]
                    self.ema_count[dead] = 1.0
                self.idle_steps[dead] = 0


class LookupFreeQuantizer(nn.Module):
    """MAGVIT-v2's LFQ: code = the signs of the latent's dims as bits; entropy penalty spreads the codes."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        bits = cfg.bits
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)
        # every code as a +-1 vector, for the soft assignment of the entropy penalty
        all_codes = torch.arange(cfg.codebook_size)[:, None]
        self.register_buffer("code_vectors", ((all_codes & self.powers) > 0).float() * 2 - 1, persistent=False)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes[..., None] & self.powers) > 0).float() * 2 - 1

    def entropy_penalty(self, flat: torch.Tensor) -> torch.Tensor:
        """E[H(p(code | z))] - H(E[p(code | z)]), p = softmax(-||z - c||^2 / T) over all codes c."""
        logits = 2 * flat @ self.code_vectors.T / self.cfg.entropy_temperature  # -||z-c||^2 up to a z-only term
        logp = F.log_softmax(logits, dim=-1)
        per_latent = -(logp.exp() * logp).sum(-1).mean()
        mean_p = logp.exp().mean(0)
        batch = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
        return per_latent - batch

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        bits = flat > 0
        codes = (bits.long() * self.powers).sum(-1)
        q = bits.to(flat.dtype) * 2 - 1
        loss = self.cfg.commitment * F.mse_loss(flat, q.detach())
        if self.training and self.cfg.entropy_weight:
            loss = loss + self.cfg.entropy_weight * self.entropy_penalty(flat)
        q_st = flat + (q - flat).detach()
        return q_st.reshape(n, h, w, d).permute(0, 3, 1, 2), codes.reshape(n, h * w), loss


QUANTIZER_CLASSES = {"vq": VectorQuantizer, "lfq": LookupFreeQuantizer}


class VQVAE(nn.Module):
    """Conv encoder -> quantizer (vq | lfq) -> conv decoder; images <-> (N, grid*grid) integer codes."""

    def __init__(self, cfg: VQConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VQConfig()
        self.encoder = _encoder(cfg)
        self.quantizer = QUANTIZER_CLASSES[cfg.quantizer](cfg)
        self.decoder = _decoder(cfg)

    @property
    def code_bits(self) -> int:
        """Bits one image's codes hold: grid cells x log2(codebook_size)."""
        return self.cfg.grid ** 2 * self.cfg.bits

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise LmstackError(f"pixels must have shape (N, 3, {s}, {s}), got {tuple(pixels.shape)}")

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels -> (reconstruction, codes, loss = reconstruction MSE + quantizer loss)."""
        self._check_pixels(pixels)
        q, codes, q_loss = self.quantizer(self.encoder(pixels))
        recon = self.decoder(q)
        return recon, codes, F.mse_loss(recon, pixels) + q_loss

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> codes (N, grid*grid), int64 in [0, codebook_size)."""
        self._check_pixels(pixels)
        was = self.training
        self.eval()
        _, codes, _ = self.quantizer(self.encoder(pixels))
        self.train(was)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, grid*grid) -> pixels (N, 3, S, S) clamped to [-1, 1]; an id outside the codebook raises."""
        cfg = self.cfg
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[1] != cfg.grid ** 2:
            raise LmstackError(f"codes must have shape (N, {cfg.grid ** 2}) for a {cfg.grid}x{cfg.grid} grid, "
                               f"got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point:
            raise LmstackError(f"codes must be integers, got {codes.dtype}")
        bad = (codes < 0) | (codes >= cfg.codebook_size)
        if bad.any():
            raise LmstackError(f"code id {int(codes[bad][0])} is outside the codebook (0..{cfg.codebook_size - 1})")
        vecs = self.quantizer.lookup(codes.long())  # (N, h*w, D)
        n = codes.shape[0]
        z = vecs.reshape(n, cfg.grid, cfg.grid, -1).permute(0, 3, 1, 2)
        return self.decoder(z).clamp(-1, 1)

    def save(self, path: str | Path) -> Path:
        """vq_model.safetensors + vq_config.json into `path`, each written atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path / f".{WEIGHTS_FILE}.tmp"
        save_file(tensors, str(tmp))
        data = tmp.read_bytes()
        tmp.unlink()
        atomic_write_bytes(path / WEIGHTS_FILE, data)
        atomic_write_text(path / CONFIG_FILE, json.dumps({"format": "lmstack-vq-1", **to_dict(self.cfg)}, indent=2))
        return path


def load_vq(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """A VQVAE written by VQVAE.save; a missing, foreign or mismatched file raises LmstackError."""
    meta = read_json(path, CONFIG_FILE, "VQ-VAE config", want_object=True)
    if meta.pop("format", None) != "lmstack-vq-1":
        raise LmstackError(f"{Path(path) / CONFIG_FILE} is not an lmstack VQ-VAE config (format lmstack-vq-1)")
    model = VQVAE(from_dict(VQConfig, meta))
    tensors = load_safetensors(path, WEIGHTS_FILE, "VQ-VAE weights")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise LmstackError(f"{Path(path) / WEIGHTS_FILE} does not fit {CONFIG_FILE}: {e}") from None
    return model.to(device).eval()


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """How the codes spread: fraction of the codebook used, and the perplexity exp(H) of the code histogram."""
    counts = torch.bincount(torch.as_tensor(codes).flatten().long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"usage": float((counts > 0).double().mean()), "used": int((counts > 0).sum()),
            "perplexity": math.exp(entropy), "codebook_size": codebook_size}


def train_vq(model: VQVAE, pixels: torch.Tensor, steps: int = 500, batch_size: int = 64, lr: float = 2e-3,
             seed: int = 0, log_every: int = 0) -> list[dict]:
    """Adam on random batches of `pixels`; returns [{step, loss, mse}] every log_every steps (and the last)."""
    if pixels.shape[0] < 1 or steps < 1:
        raise LmstackError("train_vq needs at least one image and one step")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    history = []
    for step in range(1, steps + 1):
        batch = pixels[torch.randint(0, pixels.shape[0], (batch_size,), generator=gen)]
        recon, _, loss = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (log_every and step % log_every == 0) or step == steps:
            mse = float(F.mse_loss(recon.detach(), batch))
            history.append({"step": step, "loss": float(loss.detach()), "mse": mse})
    model.eval()
    return history


def psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [-1, 1] (peak-to-peak 2), from the mean squared error."""
    mse = F.mse_loss(recon.clamp(-1, 1), target).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


__all__ = ["VQConfig", "VQVAE", "VectorQuantizer", "LookupFreeQuantizer", "load_vq", "codebook_stats", "train_vq",
           "psnr", "QUANTIZERS"]
