"""Gradient noise scale (McCandlish et al. 2018) and the adaptive batch size it drives.

The "simple" noise scale B = tr(Σ) / |G|² says how large a batch can be before more data per step
stops helping. With gradient norms measured at two batch sizes, b (one micro-batch) and B
(the accumulated batch), unbiased estimates are
    |G|²   ≈ (B |g_B|² − b |g_b|²) / (B − b)
    tr(Σ)  ≈ (|g_b|² − |g_B|²) / (1/b − 1/B)
Both are noisy, so we keep exponential moving averages of each and take their ratio.
`AdaptiveBatch` doubles gradient-accumulation steps when the noise scale outgrows the current batch.

Usage:
    gns = NoiseScale(); gns.update(small_sq_norm, b, big_sq_norm, B); gns.value
    policy = AdaptiveBatch(max_accum=16); accum = policy.next_accum(accum, micro_batch_rows, gns.value)
"""
from __future__ import annotations

import math


class NoiseScale:
    def __init__(self, ema: float = 0.95):
        self.ema = ema
        self.g2: float | None = None
        self.trace: float | None = None

    def update(self, small_sq: float, b: int, big_sq: float, big_b: int) -> None:
        if big_b <= b:
            return  # needs two different batch sizes
        g2 = (big_b * big_sq - b * small_sq) / (big_b - b)
        tr = (small_sq - big_sq) / (1.0 / b - 1.0 / big_b)
        self.g2 = g2 if self.g2 is None else self.ema * self.g2 + (1 - self.ema) * g2
        self.trace = tr if self.trace is None else self.ema * self.trace + (1 - self.ema) * tr

    @property
    def value(self) -> float:
        """B_simple in rows (sequences); nan until estimated, inf if the mean gradient vanished."""
        if self.g2 is None or self.trace is None:
            return math.nan
        if self.g2 <= 0:
            return math.inf
        return max(self.trace, 0.0) / self.g2


class AdaptiveBatch:
    def __init__(self, max_accum: int = 64, patience: int = 1):
        self.max_accum = max_accum
        self.patience = patience
        self._over = 0

    def next_accum(self, accum: int, rows_per_micro: int, noise_scale: float) -> int:
        """Double accumulation when the noise scale exceeds the global batch for `patience` checks."""
        if math.isnan(noise_scale) or accum >= self.max_accum:
            return accum
        if noise_scale > accum * rows_per_micro:
            self._over += 1
            if self._over >= self.patience:
                self._over = 0
                return min(accum * 2, self.max_accum)
        else:
            self._over = 0
        return accum
