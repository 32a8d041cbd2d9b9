"""Position schemes: RoPE (with linear / NTK / YaRN / Llama-3 scaling), ALiBi, learned and sinusoidal.

RoPE rotates query/key pairs by an angle proportional to the position, so a q·k score depends only
on the offset between them. We use the "rotate half" layout (dimension i pairs with i + head_dim/2),
which is what HF llama-family checkpoints store, so no weight permutation is needed on import.
ALiBi adds -slope_h * distance to the scores instead; learned and sinusoidal positions are added to the
token embeddings.

Usage:
    rope = RotaryEmbedding(cfg)
    cos, sin = rope(torch.arange(T))          # (T, head_dim) each
    q = apply_rotary(q, cos, sin)             # q: (B, H, T, head_dim)
    slopes = alibi_slopes(8)                  # 1/2, 1/4, ..., 1/256
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lmstack.model.config import ModelConfig


# ---- RoPE inverse frequencies: one function per scaling scheme, each returns (inv_freq, attention_scale)
def _default_freqs(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 1.0


def _linear_freqs(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    # Position interpolation (Chen et al. 2023): positions are squeezed by the factor.
    inv_freq, _ = _default_freqs(cfg)
    return inv_freq / cfg.rope_factor, 1.0


def _ntk_freqs(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    # Static "NTK-aware" scaling: raise the base so the lowest frequency stretches by the factor
    # while the highest ones barely move.
    d = cfg.head_dim
    base = cfg.rope_theta * cfg.rope_factor ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 1.0


def _yarn_freqs(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): interpolate low-frequency dims, extrapolate high-frequency ones,
    # ramp linearly in between, and scale attention logits by 0.1*ln(factor) + 1.
    d, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    original = cfg.rope_original_max_seq_len

    def dim_for_rotations(n_rot: float) -> float:
        return d * math.log(original / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(cfg.rope_yarn_beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(cfg.rope_yarn_beta_slow)), d - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    interpolated = extrapolated / factor
    keep = 1.0 - ramp  # 1 where the dimension rotates fast enough to be left unscaled
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, scale


def _llama3_freqs(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    # Llama 3.1: long wavelengths are divided by the factor, short ones kept, smooth blend between.
    inv_freq, _ = _default_freqs(cfg)
    original, factor = cfg.rope_original_max_seq_len, cfg.rope_factor
    low_wavelen = original / cfg.rope_low_freq_factor
    high_wavelen = original / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(medium, blended, out), 1.0


ROPE_SCALING = {"none": _default_freqs, "linear": _linear_freqs, "ntk": _ntk_freqs, "yarn": _yarn_freqs,
                "llama3": _llama3_freqs}


# Tables start at this many positions (or max_seq_len if smaller) and double on demand, so a config with
# max_position_embeddings 2**31 costs nothing until positions that far are used (issue 15).
INITIAL_TABLE_LENGTH = 4096


def initial_table_length(cfg: ModelConfig) -> int:
    """Rows a RoPE or sinusoidal table holds right after construction."""
    return min(cfg.max_seq_len, INITIAL_TABLE_LENGTH)


def _grown_length(needed: int, current: int, max_len: int) -> int:
    """Double, but not past max_len unless the positions themselves go further (RoPE extrapolation)."""
    return max(needed, min(2 * current, max_len))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, built lazily: initial_table_length rows, doubled when positions pass them.

    Each row depends only on its position (cos/sin of t * inv_freq, elementwise), so a table grown later
    holds bit-identical rows to one built at full length in one go (tests/model/test_positions.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_scale = ROPE_SCALING[cfg.rope_scaling](cfg)
        self.max_len = cfg.max_seq_len
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(initial_table_length(cfg))

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_table", emb.cos() * self.attention_scale, persistent=False)
        self.register_buffer("sin_table", emb.sin() * self.attention_scale, persistent=False)

    static = False
    """Set by a caller that grew the table past every position it will pass (the engine's decode graphs,
    infer/cuda_graphs.py): the lookup then reads no value back, so a CUDA graph can record it and
    torch.compile can trace it whole."""

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1 if positions.numel() and not self.static else 0
        if needed > self.cos_table.shape[0]:
            self._build(_grown_length(needed, self.cos_table.shape[0], self.max_len))
        return self.cos_table[positions], self.sin_table[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by the angles in cos/sin (T, head_dim), rotate-half layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    if cos.dtype != x.dtype:  # the tables are fp32; a bf16/fp16 model rotates in its own dtype
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotated * sin


# ---- ALiBi
def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes from the ALiBi paper: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power
    of two; otherwise the slopes of the nearest lower power of two plus every other slope of the next one."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return torch.tensor(power_of_two(n_heads))
    lower = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower])


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
    """(H, Tq, Tk) additive bias: -slope * distance (distance = |q - k| for bidirectional attention)."""
    dist = (q_pos[:, None] - k_pos[None, :]).to(slopes.dtype)
    dist = dist.clamp(min=0) if causal else dist.abs()
    return -slopes[:, None, None] * dist


# ---- additive positions
class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position embeddings (Vaswani et al. 2017), added to the token embeddings."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        # lazy like RoPE: rows up to the positions used, grown by doubling
        self.register_buffer("table", self._table(min(max_len, INITIAL_TABLE_LENGTH)), persistent=False)

    def _table(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / self.d_model))
        table = torch.zeros(length, self.d_model)
        table[:, 0::2] = torch.sin(pos * div)
        table[:, 1::2] = torch.cos(pos * div[: self.d_model // 2])
        return table

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        needed = int(positions.max()) + 1
        if needed > self.table.shape[0]:
            self.table = self._table(_grown_length(needed, self.table.shape[0], self.max_len)).to(self.table.device)
        return self.table[positions]
