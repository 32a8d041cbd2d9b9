"""Audio input for the speech models: WAV bytes in and out, resampling, and Whisper's log-mel features, in numpy
and torch (torchaudio does not import beside this torch build).

`log_mel` computes what OpenAI's Whisper and transformers' WhisperFeatureExtractor compute, written from the
recipe: a centred STFT (periodic Hann window, 400-sample frames, hop 160 at 16 kHz, reflect padding), the
power spectrum, 80 triangular mel filters on the Slaney scale with Slaney area normalisation, log10 floored at
1e-10, the last frame dropped, values clipped to 8 below the maximum, then (x + 4) / 4.
tests/multimodal/test_audio.py checks it against transformers to 1e-4.

What is refused, each with an LmstackError naming the problem (the server turns it into a 400): bytes that are
not a RIFF/WAVE file, compressed WAV (only integer PCM is read), an empty or over-long recording.

Usage:
    from lmstack.multimodal.audio import read_wav, write_wav, resample, log_mel, SAMPLE_RATE
    samples, rate = read_wav(open("speech.wav", "rb").read())      # float32 mono in [-1, 1]
    samples = resample(samples, rate, SAMPLE_RATE)
    feats = log_mel(samples)                                       # (80, frames) float32
    feats = log_mel(samples, pad_to_seconds=30)                    # Whisper's fixed 30 s window: (80, 3000)
    wav_bytes = write_wav(samples, SAMPLE_RATE)
"""
from __future__ import annotations

import io
import math
import wave
from functools import lru_cache
from math import gcd

import numpy as np
import torch
from scipy.signal import resample_poly

from lmstack.errors import LmstackError

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
N_MELS = 80
MAX_SECONDS = 600.0
"""Longest recording read_wav accepts by default (a memory guard for uploads)."""


def read_wav(data: bytes, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int]:
    """WAV bytes -> (float32 mono samples in [-1, 1], sample rate). Channels are averaged."""
    if not data:
        raise LmstackError("the audio is empty (0 bytes)")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise LmstackError("the audio is not a WAV file (no RIFF/WAVE header); send 16-bit PCM WAV")
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if rate <= 0:
                raise LmstackError(f"the WAV file's sample rate is {rate}")
            if n / rate > max_seconds:
                raise LmstackError(f"the audio is {n / rate:.1f} s long, over the limit of {max_seconds:g} s")
            raw = w.readframes(n)
    except (wave.Error, EOFError) as err:  # compressed formats, broken headers
        raise LmstackError(f"the WAV file cannot be read: {err} (only integer PCM is supported)") from None
    if width not in (1, 2, 4):
        raise LmstackError(f"{8 * width}-bit WAV is not supported; send 8-, 16- or 32-bit PCM")
    usable = len(raw) // (width * channels) * width * channels  # a file cut short mid-frame keeps whole frames
    if usable == 0:
        raise LmstackError("the WAV file holds no samples")
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw[:usable], dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        dtype = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw[:usable], dtype=dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    return x.reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def write_wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """float samples in [-1, 1] (clipped) -> 16-bit PCM mono WAV bytes."""
    x = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes((np.round(x * 32767.0)).astype("<i2").tobytes())
    return buf.getvalue()


def resample(samples: np.ndarray, rate_from: int, rate_to: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited polyphase resampling (scipy's resample_poly); the same rate returns the samples unchanged."""
    if rate_from <= 0 or rate_to <= 0:
        raise LmstackError(f"sample rates must be positive, got {rate_from} -> {rate_to}")
    if rate_from == rate_to:
        return np.asarray(samples, dtype=np.float32)
    g = gcd(int(rate_from), int(rate_to))
    return resample_poly(np.asarray(samples, dtype=np.float64), rate_to // g, rate_from // g).astype(np.float32)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(f < 1000.0, f * 3.0 / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / log_step)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * np.exp(log_step * (m - 15.0)))


@lru_cache(maxsize=8)
def mel_filters(rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters from 0 Hz to rate / 2, each of unit area (Slaney norm)."""
    hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2.0), n_mels + 2))
    freqs = np.linspace(0.0, rate / 2.0, n_fft // 2 + 1)
    lower = (freqs[None, :] - hz[:-2, None]) / (hz[1:-1] - hz[:-2])[:, None]
    upper = (hz[2:, None] - freqs[None, :]) / (hz[2:] - hz[1:-1])[:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def log_mel(samples: np.ndarray | torch.Tensor, rate: int = SAMPLE_RATE, n_mels: int = N_MELS,
            pad_to_seconds: float | None = None) -> torch.Tensor:
    """Whisper's log-mel spectrogram of 16 kHz mono samples: (n_mels, frames), frames = len // 160
    (with pad_to_seconds the samples are zero-padded, or cut, to that length first, as Whisper's 30 s window)."""
    if rate != SAMPLE_RATE:
        raise LmstackError(f"log_mel expects {SAMPLE_RATE} Hz audio, got {rate} Hz; resample() it first")
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32) if not torch.is_tensor(samples) else samples,
                        dtype=torch.float32).reshape(-1)
    if pad_to_seconds is not None:
        n = int(round(pad_to_seconds * rate))
        x = torch.nn.functional.pad(x[:n], (0, max(0, n - x.numel())))
    if x.numel() < N_FFT // 2 + 1:
        raise LmstackError(f"the audio is {x.numel()} samples long; at least {N_FFT // 2 + 1} are needed")
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect",
                      return_complex=True)
    power = spec[:, :-1].abs() ** 2  # Whisper drops the last frame, so frames = samples // hop
    mel = mel_filters(rate, N_FFT, n_mels) @ power
    logs = torch.clamp(mel, min=1e-10).log10()
    logs = torch.maximum(logs, logs.max() - 8.0)  # a dynamic range of 80 dB below the loudest bin
    return (logs + 4.0) / 4.0
