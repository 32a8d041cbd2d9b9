"""A neural audio codec in the SoundStream / EnCodec mould (issue 25 §2 TTS, row XII.8): 16 kHz speech <-> a few
codebooks of integer codes per frame, the tokens the VALL-E-style TTS (tts.py) models.

- encoder: a 1-D conv, then per stride s a residual unit (dilated conv + 1x1) and a strided conv (kernel 2s) that
  doubles the channels; the strides' product is the hop (320 samples = 50 frames/s by default), then a conv to
  the latent width;
- bottleneck: residual vector quantisation (rvq.py): n_q codebooks of K rows, k-means data init, EMA updates,
  commitment loss, straight-through gradients, dead-code restarts, quantizer dropout;
- decoder: the mirror image with transposed convs (kernel 2s, stride s), so T frames decode to exactly T * hop
  samples.
Losses (`reconstruction_loss`): L1 on the waveform plus a multi-resolution STFT loss (spectral convergence and
L1 of log magnitudes at three FFT sizes). There is NO adversarial (GAN) loss and no discriminator, unlike
SoundStream/EnCodec: at CPU scale the GAN costs more than it buys; the reconstructions are therefore smoother
(more muffled) than a GAN-trained codec's.

`bitrate` is arithmetic, not measured: frames/s x n_q x log2(K) bits/s (no entropy coding).
Metrics: `mel_distance` (mean |difference| of audio.log_mel, Whisper's features) and `snr_db` (waveform SNR).
Baseline helper: `mulaw_roundtrip` (downsample + mu-law quantise + upsample) at a chosen bitrate.

Usage:
    from lmstack.multimodal.codec import Codec, CodecConfig, mel_distance, snr_db, load_codec
    codec = Codec(CodecConfig(n_q=4, codebook_size=256))
    codes = codec.encode(samples)               # float32 16 kHz mono -> (4, frames) int64
    audio = codec.decode(codes)                 # -> float32 samples (frames * hop); codes[:1] decodes too
    codec.config.bitrate                        # 50 frames/s * 4 * 8 bits = 1600 bits/s (arithmetic)
    mel_distance(samples, audio), snr_db(samples, audio)
    codec.save("runs/codec"); codec = load_codec("runs/codec")   # codec_config.json + codec.safetensors
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_bytes
from torch import nn

from lmstack.config import ConfigError, atomic_write_bytes, atomic_write_text, from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model.load_guard import load_safetensors, read_json
from lmstack.multimodal.audio import SAMPLE_RATE, log_mel, resample
from lmstack.multimodal.rvq import ResidualVQ

CONFIG_FILE, WEIGHTS_FILE = "codec_config.json", "codec.safetensors"
FORMAT = "lmstack-codec-1"
MAX_SECONDS = 60.0
"""Longest audio encode() accepts (a memory guard)."""


@dataclass
class CodecConfig:
    channels: int = 16
    """Channels after the first conv; each stride doubles them."""
    strides: list[int] = field(default_factory=lambda: [2, 4, 5, 8])
    """Downsampling factors of the encoder (mirrored by the decoder); their product is the hop in samples."""
    latent_dim: int = 64
    """Width of the latent vector per frame (and of every codebook row)."""
    n_q: int = 4
    """Number of residual codebooks."""
    codebook_size: int = 256
    """Rows per codebook (K); a power of two, log2(K) bits per code."""
    ema_decay: float = 0.99
    """EMA decay of the codebook updates (0 freezes the codebooks after the k-means init)."""
    commitment: float = 0.25
    """Weight of each stage's commitment loss."""
    dead_after: int = 30
    """A codebook row unused for this many steps restarts at a random residual (0 = never)."""
    quantizer_dropout: float = 0.5
    """Fraction of training batches that use a random prefix of the codebooks (so fewer codes still decode)."""
    gain: float = 8.0
    """Fixed input gain (the decoder divides it out): espeak-ng speech has an RMS near 0.1, and the convs learn
    faster on signals near unit scale (measured: a third less STFT loss after 150 steps, 1.55 vs 2.44)."""

    def __post_init__(self):
        self.strides = list(self.strides)
        if not self.strides or any(not isinstance(s, int) or s < 2 for s in self.strides):
            raise ConfigError(f"strides={self.strides!r} must be a non-empty list of integers >= 2")
        k = self.codebook_size
        if not isinstance(k, int) or k < 2 or k & (k - 1):
            raise ConfigError(f"codebook_size={k!r} must be a power of two >= 2")
        if self.n_q < 1 or self.channels < 1 or self.latent_dim < 1:
            raise ConfigError(f"n_q, channels and latent_dim must be >= 1; got {self.n_q}, {self.channels}, "
                              f"{self.latent_dim}")
        if not self.gain > 0:
            raise ConfigError(f"gain={self.gain} must be > 0")
        if not 0 <= self.quantizer_dropout <= 1 or not 0 <= self.ema_decay < 1:
            raise ConfigError("quantizer_dropout must be in [0, 1] and ema_decay in [0, 1)")

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.hop

    @property
    def bitrate(self) -> float:
        """Bits per second, arithmetic: frames/s x n_q x log2(codebook_size)."""
        return self.bitrate_at(self.n_q)

    def bitrate_at(self, n_q: int) -> float:
        return self.frame_rate * n_q * math.log2(self.codebook_size)


class ResUnit(nn.Module):
    """x + 1x1(ELU(dilated conv k3(ELU(x)))): a wider receptive field at no cost in length."""

    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.elu(self.conv(F.elu(x))))


def _encoder(cfg: CodecConfig) -> nn.Sequential:
    layers, ch = [nn.Conv1d(1, cfg.channels, 7, padding=3)], cfg.channels
    for i, s in enumerate(cfg.strides):
        # kernel 2s, padding ceil(s/2): a length divisible by s shrinks exactly s times
        layers += [ResUnit(ch, 3 ** (i % 3)), nn.ELU(), nn.Conv1d(ch, 2 * ch, 2 * s, stride=s, padding=(s + 1) // 2)]
        ch *= 2
    layers += [nn.ELU(), nn.Conv1d(ch, cfg.latent_dim, 3, padding=1)]
    return nn.Sequential(*layers)


def _decoder(cfg: CodecConfig) -> nn.Sequential:
    ch = cfg.channels * 2 ** len(cfg.strides)
    layers = [nn.Conv1d(cfg.latent_dim, ch, 7, padding=3)]
    for i, s in reversed(list(enumerate(cfg.strides))):
        # the transposed conv with output_padding s % 2 grows T frames to exactly T * s samples
        layers += [nn.ELU(), nn.ConvTranspose1d(ch, ch // 2, 2 * s, stride=s, padding=(s + 1) // 2,
                                                output_padding=s % 2), ResUnit(ch // 2, 3 ** (i % 3))]
        ch //= 2
    layers += [nn.ELU(), nn.Conv1d(ch, 1, 7, padding=3)]
    return nn.Sequential(*layers)


def check_samples(samples, rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> torch.Tensor:
    """Mono float samples at 16 kHz -> a (L,) float32 tensor; wrong rate, empty, non-finite or too long raises."""
    if rate != SAMPLE_RATE:
        raise LmstackError(f"the codec takes {SAMPLE_RATE} Hz audio, got {rate} Hz; resample() it first")
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32) if not torch.is_tensor(samples) else samples,
                        dtype=torch.float32)
    if x.dim() != 1:
        raise LmstackError(f"samples must be 1-D mono audio, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise LmstackError("the audio is empty (0 samples)")
    if x.numel() > max_seconds * SAMPLE_RATE:
        raise LmstackError(f"the audio is {x.numel() / SAMPLE_RATE:.1f} s long, over the limit of {max_seconds:g} s")
    if not torch.isfinite(x).all():
        raise LmstackError("the audio holds NaN or infinite samples")
    return x


class Codec(nn.Module):
    """Conv encoder -> residual VQ -> transposed-conv decoder; waveforms <-> (n_q, frames) integer codes."""

    def __init__(self, config: CodecConfig | None = None):
        super().__init__()
        self.config = cfg = config or CodecConfig()
        self.encoder = _encoder(cfg)
        self.rvq = ResidualVQ(cfg.latent_dim, cfg.n_q, cfg.codebook_size, cfg.ema_decay, cfg.commitment,
                              cfg.dead_after, cfg.quantizer_dropout)
        self.decoder = _decoder(cfg)

    def pad(self, wave: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last axis up to a whole number of frames."""
        extra = -wave.shape[-1] % self.config.hop
        return F.pad(wave, (0, extra)) if extra else wave

    def forward(self, wave: torch.Tensor, n_q: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """wave (B, L), L a multiple of the hop -> (reconstruction (B, L), codes (B, n, L / hop), commitment loss)."""
        if wave.dim() != 2 or wave.shape[1] == 0 or wave.shape[1] % self.config.hop:
            raise LmstackError(f"wave must be (batch, L) with L a positive multiple of {self.config.hop}, "
                               f"got {tuple(wave.shape)}")
        q, codes, loss = self.rvq(self.encoder(wave[:, None] * self.config.gain), n_q)
        return self.decoder(q)[:, 0] / self.config.gain, codes, loss

    @torch.no_grad()
    def latents(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, L) -> encoder latents as rows (B * frames, latent_dim), for the k-means init."""
        z = self.encoder(self.pad(wave)[:, None] * self.config.gain)
        return z.permute(0, 2, 1).reshape(-1, z.shape[1])

    @torch.no_grad()
    def encode(self, samples, rate: int = SAMPLE_RATE, n_q: int | None = None) -> torch.Tensor:
        """float32 mono 16 kHz samples -> codes (n, ceil(L / hop)) int64 (n = n_q, default all codebooks)."""
        x = check_samples(samples, rate)
        was = self.training
        self.eval()
        _, codes, _ = self.rvq(self.encoder(self.pad(x)[None, None] * self.config.gain), n_q)
        self.train(was)
        return codes[0]

    @torch.no_grad()
    def decode(self, codes) -> np.ndarray:
        """codes (n, frames) ints, n <= n_q (a prefix of the codebooks) -> float32 samples in [-1, 1]."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[1] == 0:
            raise LmstackError(f"codes must have shape (codebooks, frames >= 1), got {tuple(codes.shape)}")
        was = self.training
        self.eval()
        out = (self.decoder(self.rvq.decode(codes[None]))[0, 0] / self.config.gain).clamp(-1, 1)
        self.train(was)
        return out.numpy().astype(np.float32)

    def resynthesize(self, samples, n_q: int | None = None) -> np.ndarray:
        """encode then decode, cut to the input's length."""
        x = check_samples(samples)
        return self.decode(self.encode(x, n_q=n_q))[: x.numel()]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        """codec.safetensors then codec_config.json into `path` (each atomic; the config last)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / WEIGHTS_FILE, save_bytes(self.tensors()))
        atomic_write_text(path / CONFIG_FILE, json.dumps({"format": FORMAT, **to_dict(self.config)}, indent=2))
        return path


def codec_from_parts(meta: dict, tensors: dict, source: str) -> Codec:
    """A Codec from its config dict and weights; a foreign config or mismatched weights raise naming `source`."""
    meta = dict(meta)
    if meta.pop("format", None) != FORMAT:
        raise LmstackError(f"{source} is not an lmstack codec config (format {FORMAT})")
    codec = Codec(from_dict(CodecConfig, meta))
    try:
        codec.load_state_dict(tensors)
    except RuntimeError as e:
        raise LmstackError(f"the codec weights do not fit {source}: {e}") from None
    return codec.eval()


def load_codec(path: str | Path) -> Codec:
    """A Codec written by Codec.save; a missing, foreign or mismatched file raises LmstackError."""
    meta = read_json(path, CONFIG_FILE, "codec config", want_object=True)
    return codec_from_parts(meta, load_safetensors(path, WEIGHTS_FILE, "codec weights"), str(Path(path) / CONFIG_FILE))


def _stft_power(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    spec = torch.stft(x, n_fft, n_fft // 4, window=torch.hann_window(n_fft, device=x.device), return_complex=True)
    return spec.real.square() + spec.imag.square()


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor,
                        ffts: tuple[int, ...] = (256, 512, 1024), eps: float = 1e-7) -> dict[str, torch.Tensor]:
    """L1 waveform + multi-resolution STFT loss (spectral convergence + L1 of log power) over `ffts`.
    The log is of power + eps, not of a clamped magnitude: a clamp would stop the gradient of every quiet bin,
    and a fresh decoder's output is all quiet bins."""
    l1 = F.l1_loss(recon, target)
    stft = recon.new_zeros(())
    for n in ffts:
        a, b = _stft_power(recon, n), _stft_power(target, n)
        sc = torch.linalg.norm((b + eps).sqrt() - (a + eps).sqrt()) / torch.linalg.norm((b + eps).sqrt())
        stft = stft + sc + 0.5 * F.l1_loss((a + eps).log(), (b + eps).log())
    stft = stft / len(ffts)
    return {"l1": l1, "stft": stft, "total": l1 + stft}


def _pair(ref, est) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(ref, dtype=np.float32).reshape(-1)
    b = np.asarray(est, dtype=np.float32).reshape(-1)
    n = min(a.size, b.size)
    if n == 0:
        raise LmstackError("cannot compare empty audio")
    return a[:n], b[:n]


def mel_distance(ref, est) -> float:
    """Mean absolute difference of Whisper's log-mel features (audio.log_mel) of two 16 kHz signals, cut to the
    shorter one. Lower is closer; 0 is identical."""
    a, b = _pair(ref, est)
    return float((log_mel(a) - log_mel(b)).abs().mean())


def snr_db(ref, est) -> float:
    """Waveform signal-to-noise ratio 10 log10(sum ref^2 / sum (ref - est)^2) in dB (higher is closer)."""
    a, b = _pair(ref, est)
    noise = float(np.sum((a.astype(np.float64) - b) ** 2))
    power = float(np.sum(a.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * math.log10(max(power, 1e-20) / noise)


def mulaw_roundtrip(samples, rate: int, bits: int) -> np.ndarray:
    """The classical baseline: resample 16 kHz audio to `rate`, mu-law quantise to `bits` bits, decode and
    resample back (rate x bits bits/s). The output has the input's length."""
    x = check_samples(samples).numpy()
    if not 2 <= bits <= 16 or not 100 <= rate <= SAMPLE_RATE:
        raise LmstackError(f"mu-law needs 2..16 bits and a rate in 100..{SAMPLE_RATE} Hz; got {bits}, {rate}")
    low = np.clip(resample(x, SAMPLE_RATE, rate), -1, 1).astype(np.float64)
    mu = 2 ** bits - 1
    comp = np.sign(low) * np.log1p(mu * np.abs(low)) / np.log1p(mu)
    q = np.round((comp + 1) / 2 * mu) / mu * 2 - 1  # bits-bit uniform levels of the companded signal
    back = np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu
    up = resample(back.astype(np.float32), rate, SAMPLE_RATE)
    return np.pad(up, (0, max(0, x.size - up.size)))[: x.size].astype(np.float32)


__all__ = ["Codec", "CodecConfig", "load_codec", "codec_from_parts", "reconstruction_loss", "mel_distance",
           "snr_db", "mulaw_roundtrip", "check_samples", "MAX_SECONDS"]
