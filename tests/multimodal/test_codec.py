"""The neural audio codec (multimodal/codec.py): shapes, refusals, metrics, the mu-law baseline, save/load, and
that a few steps of training make reconstruction better."""
import math

import numpy as np
import pytest
import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.multimodal.codec import (Codec, CodecConfig, load_codec, mel_distance, mulaw_roundtrip,
                                      reconstruction_loss, snr_db)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = CodecConfig(channels=4, strides=[2, 4, 5], latent_dim=8, n_q=3, codebook_size=16)


def _tone(seconds=0.25, f=220.0):
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.5 * np.sin(2 * np.pi * f * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


def test_encode_decode_shapes_and_bitrate():
    codec = Codec(TINY)
    x = _tone()
    codes = codec.encode(x)
    assert codes.shape == (3, math.ceil(x.size / 40)) and codes.dtype == torch.int64
    assert int(codes.max()) < 16 and int(codes.min()) >= 0
    y = codec.decode(codes)
    assert y.dtype == np.float32 and y.shape == (codes.shape[1] * 40,)
    assert codec.decode(codes[:1]).shape == y.shape  # a prefix of the codebooks decodes (a lower bitrate)
    assert codec.encode(x, n_q=2).shape == (2, codes.shape[1])
    assert TINY.frame_rate == 400 and TINY.bitrate == 400 * 3 * 4 and CodecConfig().bitrate == 50 * 4 * 8


@pytest.mark.parametrize("samples, rate, message", [
    (np.zeros(0, np.float32), 16000, "empty"), (np.zeros(800, np.float32), 8000, "8000 Hz"),
    (np.zeros((2, 800), np.float32), 16000, "1-D"), (np.full(800, np.nan, np.float32), 16000, "NaN")])
def test_bad_audio_is_refused(samples, rate, message):
    with pytest.raises(LmstackError, match=message):
        Codec(TINY).encode(samples, rate)


def test_bad_codes_and_config_are_refused():
    codec = Codec(TINY)
    with pytest.raises(LmstackError, match="outside the codebook"):
        codec.decode(torch.full((3, 4), 99))
    with pytest.raises(LmstackError, match="codebooks, frames"):
        codec.decode(torch.zeros(3, 0, dtype=torch.long))
    with pytest.raises(ConfigError, match="power of two"):
        CodecConfig(codebook_size=100)
    with pytest.raises(ConfigError, match="strides"):
        CodecConfig(strides=[1, 4])


def test_metrics_and_mulaw_baseline():
    x = _tone(0.5)
    assert mel_distance(x, x) == 0.0 and snr_db(x, x) == float("inf")
    noisy = x + 0.05 * np.random.default_rng(0).standard_normal(x.size).astype(np.float32)
    assert mel_distance(x, noisy) > 0.0 and 5 < snr_db(x, noisy) < 20
    fine, coarse = mulaw_roundtrip(x, 8000, 8), mulaw_roundtrip(x, 8000, 3)
    assert fine.shape == x.shape and snr_db(x, fine) > snr_db(x, coarse) > 0
    with pytest.raises(LmstackError, match="empty"):
        mel_distance([], x)


def test_training_improves_reconstruction_and_save_load(tmp_path):
    torch.manual_seed(0)
    codec = Codec(TINY)
    wave = torch.from_numpy(np.stack([_tone(0.1, f) for f in (180.0, 260.0, 330.0, 410.0)]))
    codec.rvq.fit_kmeans(codec.latents(wave), iters=3)
    opt = torch.optim.Adam(codec.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        recon, _, q_loss = codec(wave)
        loss = reconstruction_loss(recon, wave)["total"] + q_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    codec.save(tmp_path / "c")
    again = load_codec(tmp_path / "c")
    x = wave[0].numpy()
    assert np.array_equal(again.decode(again.encode(x)), codec.decode(codec.encode(x)))
    (tmp_path / "c" / "codec_config.json").write_text('{"format": "x"}')
    with pytest.raises(LmstackError, match="not an lmstack codec"):
        load_codec(tmp_path / "c")
