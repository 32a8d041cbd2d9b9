"""multimodal/audio.py: WAV in and out, resampling, and Whisper's log-mel features (parity with transformers)."""
import io
import wave

import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.audio import SAMPLE_RATE, log_mel, mel_filters, read_wav, resample, write_wav


def _tone(freq=440.0, seconds=0.5, rate=SAMPLE_RATE, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_log_mel_equals_transformers_whisper_features():
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor()
    rng = np.random.default_rng(0)
    audio = (_tone(300.0, 2.0) + 0.05 * rng.standard_normal(2 * SAMPLE_RATE)).astype(np.float32)
    want = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]  # padded to 30 s
    got = log_mel(audio, pad_to_seconds=30).numpy()
    assert got.shape == want.shape == (80, 3000)
    assert np.abs(got - want).max() < 1e-4


def test_mel_filters_have_unit_area_and_cover_the_band():
    f = mel_filters().numpy()
    assert f.shape == (80, 201) and (f >= 0).all()
    hz_per_bin = SAMPLE_RATE / 2 / 200
    areas = f.sum(axis=1) * hz_per_bin  # Slaney norm: each triangle has area ~1 (2 / width * width / 2)
    assert np.allclose(areas[5:], 1.0, rtol=0.15)
    peaks = f.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > 190  # rising centre frequencies up to Nyquist


def test_a_tone_lights_its_own_mel_band():
    low, high = log_mel(_tone(200.0)), log_mel(_tone(3000.0))
    assert low.shape == (80, 50)
    assert int(low.mean(dim=1).argmax()) < int(high.mean(dim=1).argmax())


def test_wav_round_trip_and_formats():
    x = _tone(seconds=0.1)
    y, rate = read_wav(write_wav(x, SAMPLE_RATE))
    assert rate == SAMPLE_RATE and np.abs(y - x).max() < 1e-4
    buf = io.BytesIO()  # 8-bit stereo: unsigned samples, channels averaged
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes([128, 255] * 10))
    y, rate = read_wav(buf.getvalue())
    assert rate == 8000 and y.shape == (10,) and np.allclose(y, (0 + 127 / 128) / 2)


def test_resample_keeps_the_tone_and_the_duration():
    x = _tone(440.0, 1.0, rate=22050)
    y = resample(x, 22050, SAMPLE_RATE)
    assert y.shape == (SAMPLE_RATE,)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(y) - 440.0) < 2.0
    assert resample(x, 22050, 22050) is not None and np.array_equal(resample(x, 22050, 22050), x)


def test_refusals_name_the_problem():
    with pytest.raises(LmstackError, match="not a WAV"):
        read_wav(b"ID3\x03mp3 data here, not a wav")
    with pytest.raises(LmstackError, match="empty"):
        read_wav(b"")
    with pytest.raises(LmstackError, match="over the limit"):
        read_wav(write_wav(_tone(seconds=1.0)), max_seconds=0.5)
    with pytest.raises(LmstackError, match="no samples"):
        read_wav(write_wav(np.zeros(0, dtype=np.float32)))
    with pytest.raises(LmstackError, match="resample"):
        log_mel(_tone(), rate=8000)
    with pytest.raises(LmstackError, match="at least"):
        log_mel(np.zeros(10, dtype=np.float32))
    with pytest.raises(LmstackError, match="positive"):
        resample(_tone(), 0, SAMPLE_RATE)
    assert torch.isfinite(log_mel(np.zeros(SAMPLE_RATE, dtype=np.float32))).all()  # silence: finite, floored
