"""serve/audio_input.py: WAV, FLAC and MP3 uploads decode to 16 kHz mono float32, and every bad upload is refused
with a message that names the problem (format sniffed from the content, lengths read from the header)."""
import io
import struct

import numpy as np
import pytest
import soundfile as sf

from lmstack.errors import LmstackError
from lmstack.multimodal.audio import resample
from lmstack.serve.audio_input import (AudioLimits, AudioRejected, decode_audio, sniff_format,
                                       wav_declared_seconds)


def tone(seconds=0.5, rate=16000, freq=440.0, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(x, rate=16000, fmt="WAV", subtype=None):
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def refused(data, match, status=400, **kw):
    with pytest.raises(AudioRejected, match=match) as info:
        decode_audio(data, kw.pop("filename", "speech.wav"), **kw)
    assert info.value.status == status and isinstance(info.value, LmstackError)
    return str(info.value)


def test_wav_and_flac_decode_exactly_at_16k():
    x = tone()
    for fmt in ("WAV", "FLAC"):
        y = decode_audio(encode(x, fmt=fmt), None)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert np.abs(y - x).max() < 1.0 / 32768 + 1e-6  # 16-bit quantisation only


def test_mp3_decodes_close_to_the_original():
    x = tone(1.0)
    data = encode(x, fmt="MP3")
    assert sniff_format(data) == "MP3"
    y = decode_audio(data, "a.mp3")
    assert abs(len(y) - len(x)) <= 2048  # an encoder adds at most a frame or two of padding
    n = min(len(x), len(y))
    best = max(np.corrcoef(x[:n - s], y[s:n])[0, 1] for s in range(0, 1200, 1))  # the decoder's delay
    assert best > 0.95


def test_stereo_44k_becomes_mono_16k():
    left, right = tone(0.5, 44100, 300.0, 0.4), tone(0.5, 44100, 700.0, 0.2)
    y = decode_audio(encode(np.stack([left, right], axis=1), rate=44100, subtype="FLOAT"), "st.wav")
    expected = resample((left + right) / 2, 44100, 16000)
    assert y.shape == expected.shape == (8000,)
    assert np.abs(y - expected).max() < 1e-5


def test_format_is_sniffed_from_content_not_name():
    ogg = encode(tone(), fmt="OGG")
    msg = refused(ogg, "OGG", filename="speech.wav")
    assert "WAV, FLAC or MP3" in msg and "speech.wav" in msg
    assert "text" in refused(b"hello, this is not audio at all\n" * 4, "WAV, FLAC or MP3")
    assert "PNG" in refused(b"\x89PNG\r\n\x1a\n" + bytes(64), "not audio")
    # an AAC (ADTS) stream has the MPEG sync bits but the reserved layer 00: not MP3
    assert sniff_format(b"\xff\xf1\x50\x80" + bytes(32)) is None
    # a FLAC name on WAV content is read as WAV
    assert decode_audio(encode(tone()), "x.flac").shape == (8000,)


def test_empty_and_oversized_uploads():
    refused(b"", "empty")
    data = encode(tone())
    msg = refused(data, "max_audio_bytes", status=413, max_bytes=len(data) - 1)
    assert str(len(data)) in msg


def test_ninety_minute_headers_are_refused_before_decoding():
    wav = bytearray(encode(tone(1.0)))
    n = 90 * 60 * 16000 * 2
    wav[40:44], wav[4:8] = struct.pack("<I", n), struct.pack("<I", n + 36)
    assert wav_declared_seconds(bytes(wav)) == pytest.approx(5400.0)
    assert "5400.0 s" in refused(bytes(wav), "WAV header declares")
    # FLAC: STREAMINFO's 36-bit total sample count (libsndfile reports it before decoding anything)
    flac = bytearray(encode(tone(1.0), fmt="FLAC"))
    info = int.from_bytes(flac[18:26], "big")
    flac[18:26] = ((info & ~((1 << 36) - 1)) | 90 * 60 * 16000).to_bytes(8, "big")
    refused(bytes(flac), "FLAC header declares.*--max_audio_seconds")


def test_streamed_wav_is_bounded_by_decoding():
    """A WAV written to a pipe declares no size; its length comes from its data (libsndfile's count)."""
    wav = bytearray(encode(tone(3.0)))
    wav[40:44] = struct.pack("<I", 0xFFFFFFFF)
    assert wav_declared_seconds(bytes(wav)) is None
    refused(bytes(wav), r"3\.0 s long \(as its WAV data size shows\).*at most 2 s", max_seconds=2.0)
    assert decode_audio(bytes(wav), None, max_seconds=4.0).shape == (48000,)


def test_flac_without_a_length_is_bounded_by_decoding():
    """A FLAC streamed through a pipe declares 0 samples: decoding stops one block past max_seconds; a file cut
    short keeps what decodes."""
    x = tone(3.0)
    flac = bytearray(encode(x, fmt="FLAC"))
    info = int.from_bytes(flac[18:26], "big")
    flac[18:26] = (info & ~((1 << 36) - 1)).to_bytes(8, "big")
    refused(bytes(flac), "over 2 s long.*declares no length", max_seconds=2.0)
    y = decode_audio(bytes(flac), None, max_seconds=4.0)
    assert y.shape == x.shape and np.abs(y - x).max() < 1e-4
    whole = encode(x, fmt="FLAC")
    cut = decode_audio(whole[:len(whole) // 2], None)
    assert 0.2 * len(x) < len(cut) < 0.8 * len(x) and np.abs(cut - x[:len(cut)]).max() < 1e-4


def test_sample_rate_range_channels_and_short_audio():
    assert "4000 Hz" in refused(encode(tone(0.5, 4000, 300.0), rate=4000), "8000-48000 Hz")
    refused(encode(tone(0.5, 96000), rate=96000), "96000 Hz")
    assert decode_audio(encode(tone(0.5, 8000, 300.0), rate=8000), None).shape == (8000,)
    nine = np.tile(tone(0.2)[:, None], (1, 9))
    refused(encode(nine, subtype="PCM_16"), "9 channels")
    refused(encode(tone(0.05)), "at least 0.1 s")


def test_silence_nan_and_corrupt_data():
    assert "-60 dBFS" in refused(encode(np.zeros(16000, np.float32)), "silent")
    refused(encode(tone() * 1e-4, subtype="FLOAT"), "silent")
    bad = tone()
    bad[100] = np.nan
    refused(encode(bad, subtype="FLOAT"), "NaN")
    refused(b"fLaC" + bytes(range(256)) * 4, "cannot be decoded")


def test_limits_check_their_values():
    assert AudioLimits(max_seconds=2).decode(encode(tone(1.0)), None).shape == (16000,)
    with pytest.raises(ValueError, match="max_audio_seconds"):
        AudioLimits(max_seconds=0)
    with pytest.raises(ValueError, match="max_audio_bytes"):
        AudioLimits(max_bytes=0)
