"""Residual vector quantisation (RVQ), the bottleneck of SoundStream and EnCodec (issue 25 §2 TTS, row XII.8).

n_q codebooks of K rows each. Codebook 1 snaps a latent vector to its nearest row; codebook 2 snaps what is left
over (the residual), and so on: the latent's approximation is the sum of the n_q chosen rows, and the first j
codes alone give a coarser approximation (a lower bitrate from the same model). How the codebooks learn:
- data init: `fit_kmeans(x)` runs Lloyd's k-means stage by stage on real latents (each stage on the residuals
  the stages before it leave), so training starts from codebooks that cover the data;
- EMA updates during training (van den Oord et al. 2017, appendix; SoundStream): each row moves to the moving
  average of the vectors assigned to it; no codebook gradient;
- a commitment loss per stage, ||r_j - sg(q_j)||^2, pulls the encoder towards its codes; straight-through
  gradients carry the decoder's gradient past the snap;
- dead-code restart: a row unused for `dead_after` steps restarts at a random residual of the batch.
- quantizer dropout (SoundStream): in training, some batches use only the first j codebooks (j random), so
  every prefix of the codes decodes, which is what `n_q=1` vs all measures.

Why more codebooks never fit worse on the data k-means fitted them to: after a Lloyd update every used row is
the mean of its vectors, and the within-cluster squared error is at most the squared error around the overall
mean, which is at most the mean squared norm of the residuals themselves (test_rvq.py checks it).

Usage:
    from lmstack.multimodal.rvq import ResidualVQ
    rvq = ResidualVQ(dim=64, n_q=4, codebook_size=256)
    rvq.fit_kmeans(latents)                     # (N, 64) float: the data init
    q, codes, loss = rvq(z)                     # z (B, 64, T) -> q (B, 64, T) straight-through, codes (B, 4, T)
    z_hat = rvq.decode(codes[:, :1])            # the first codebook alone: a coarser z
    rvq.residual_energy(latents, n_q=2)         # mean squared error left after 2 codebooks
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError


def _nearest(x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of book (K, D) for each row of x (N, D), by squared distance."""
    dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ book.T + book.pow(2).sum(1)[None]
    return dist.argmin(1)


def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means of x (N, D) into k rows, seeded from random data rows; ends on an update step, so each used
    row is the mean of its vectors. Fewer than k vectors: rows are drawn with replacement (and jittered)."""
    n = x.shape[0]
    if n == 0:
        raise LmstackError("k-means needs at least one vector")
    if n >= k:
        book = x[torch.randperm(n, generator=generator)[:k]].clone()
    else:
        pick = torch.randint(0, n, (k,), generator=generator)
        book = x[pick] + 1e-3 * x.std().clamp_min(1e-6) * torch.randn(k, x.shape[1], generator=generator)
    for _ in range(iters):
        codes = _nearest(x, book)
        counts = torch.bincount(codes, minlength=k).to(x.dtype)
        sums = torch.zeros_like(book).index_add_(0, codes, x)
        used = counts > 0
        book[used] = sums[used] / counts[used, None]  # an empty row keeps its place (it may catch vectors later)
    return book


class ResidualVQ(nn.Module):
    """n_q residual codebooks of codebook_size rows of width dim; EMA-updated, k-means-initialised."""

    def __init__(self, dim: int, n_q: int, codebook_size: int, ema_decay: float = 0.99, commitment: float = 0.25,
                 dead_after: int = 30, quantizer_dropout: float = 0.0):
        super().__init__()
        if n_q < 1 or codebook_size < 2 or dim < 1:
            raise LmstackError(f"ResidualVQ needs n_q >= 1, codebook_size >= 2 and dim >= 1; got n_q={n_q}, "
                               f"codebook_size={codebook_size}, dim={dim}")
        if not 0 <= ema_decay < 1:
            raise LmstackError(f"ema_decay={ema_decay} must be in [0, 1)")
        self.dim, self.n_q, self.codebook_size = dim, n_q, codebook_size
        self.ema_decay, self.commitment, self.dead_after = ema_decay, commitment, dead_after
        self.quantizer_dropout = quantizer_dropout
        init = torch.randn(n_q, codebook_size, dim) / dim ** 0.5
        self.register_buffer("codebooks", init)
        self.register_buffer("ema_count", torch.ones(n_q, codebook_size))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("idle_steps", torch.zeros(n_q, codebook_size, dtype=torch.long))

    def _n(self, n_q: int | None) -> int:
        n = self.n_q if n_q is None else int(n_q)
        if not 1 <= n <= self.n_q:
            raise LmstackError(f"n_q={n_q} must be in 1..{self.n_q} (the codebooks this quantiser has)")
        return n

    @torch.no_grad()
    def fit_kmeans(self, x: torch.Tensor, iters: int = 10, seed: int = 0) -> list[float]:
        """Data init: k-means each stage on the residuals of the stages before; returns the mean squared
        residual left after each stage."""
        x = self._flat_check(x)
        gen = torch.Generator().manual_seed(seed)
        residual, left = x.clone(), []
        for j in range(self.n_q):
            book = kmeans(residual, self.codebook_size, iters, gen)
            self.codebooks[j] = book
            self.ema_sum[j] = book
            self.ema_count[j] = 1.0
            self.idle_steps[j] = 0
            residual = residual - book[_nearest(residual, book)]
            left.append(float(residual.pow(2).sum(1).mean()))
        return left

    def _flat_check(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise LmstackError(f"latents must have shape (N >= 1, {self.dim}), got {tuple(x.shape)}")
        return x

    def quantize_flat(self, x: torch.Tensor, n_q: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> (sum of the chosen rows (N, D), codes (N, n), commitment loss); EMA updates in training."""
        n = self._n(n_q)
        residual = x
        total = torch.zeros_like(x)
        codes, loss = [], x.new_zeros(())
        for j in range(n):
            book = self.codebooks[j]
            c = _nearest(residual.detach(), book)
            q = book[c]
            loss = loss + self.commitment * F.mse_loss(residual, q.detach())
            if self.training:
                self._update(j, residual.detach(), c)
            total = total + q
            residual = residual - q.detach()
            codes.append(c)
        return total, torch.stack(codes, 1), loss

    def forward(self, z: torch.Tensor, n_q: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, T) -> (quantised z with straight-through gradient, codes (B, n, T) int64, commitment loss).
        In training with quantizer_dropout > 0, a batch uses a random prefix of the codebooks that often."""
        b, d, t = z.shape
        if d != self.dim:
            raise LmstackError(f"latents have {d} channels; this quantiser expects {self.dim}")
        n = self._n(n_q)
        if self.training and n_q is None and self.quantizer_dropout > 0 and torch.rand(()) < self.quantizer_dropout:
            n = int(torch.randint(1, self.n_q + 1, ()))
        flat = z.permute(0, 2, 1).reshape(-1, d)
        q, codes, loss = self.quantize_flat(flat, n)
        q_st = flat + (q - flat).detach()
        return q_st.reshape(b, t, d).permute(0, 2, 1), codes.reshape(b, t, n).permute(0, 2, 1), loss

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n, T) ints, n <= n_q (a prefix of the codebooks) -> z (B, D, T); ids are checked."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_q:
            raise LmstackError(f"codes must have shape (batch, 1..{self.n_q}, frames), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise LmstackError(f"codes must be integers, got {codes.dtype}")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            raise LmstackError(f"code id {int(codes[bad][0])} is outside the codebook (0..{self.codebook_size - 1})")
        codes = codes.long()
        z = sum(F.embedding(codes[:, j], self.codebooks[j]) for j in range(codes.shape[1]))  # (B, T, D)
        return z.permute(0, 2, 1)

    @torch.no_grad()
    def residual_energy(self, x: torch.Tensor, n_q: int | None = None) -> float:
        """Mean squared norm of x - (its approximation by the first n_q codebooks), x (N, D)."""
        x = self._flat_check(x)
        was = self.training
        self.eval()
        q, _, _ = self.quantize_flat(x, n_q)
        self.train(was)
        return float((x - q).pow(2).sum(1).mean())

    @torch.no_grad()
    def _update(self, j: int, r: torch.Tensor, codes: torch.Tensor) -> None:
        k = self.codebook_size
        counts = torch.bincount(codes, minlength=k).to(r.dtype)
        if self.ema_decay > 0:
            sums = torch.zeros_like(self.ema_sum[j]).index_add_(0, codes, r)
            self.ema_count[j].mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum[j].mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            total = self.ema_count[j].sum()  # Laplace smoothing: a rare row never divides by ~0
            smoothed = (self.ema_count[j] + 1e-5) / (total + k * 1e-5) * total
            self.codebooks[j] = self.ema_sum[j] / smoothed[:, None]
        self.idle_steps[j] += 1
        self.idle_steps[j][counts > 0] = 0
        if self.dead_after:
            dead = (self.idle_steps[j] >= self.dead_after).nonzero().flatten()
            if len(dead):
                pick = torch.randint(0, r.shape[0], (len(dead),))
                self.codebooks[j][dead] = r[pick]
                self.ema_sum[j][dead] = r[pick]
                self.ema_count[j][dead] = 1.0
                self.idle_steps[j][dead] = 0


__all__ = ["ResidualVQ", "kmeans"]
