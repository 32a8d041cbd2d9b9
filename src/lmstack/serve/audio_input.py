"""Uploaded audio for /v1/audio/transcriptions: bytes -> checked float32 mono samples at 16 kHz.

The server takes WAV, FLAC and MP3, decoded by libsndfile (the `soundfile` package). The format is read from the
content, never from the file's name: RIFF/WAVE (or RF64), `fLaC`, or an ID3 tag / MPEG audio frame sync. Anything
else (OGG, text, a picture, an AAC stream) is refused by name, even when it is called x.wav.

Every refusal is an `AudioRejected` (an LmstackError carrying the HTTP status the server answers with) whose
message says what is wrong and the rule it broke:
- empty (0 bytes), more bytes than `max_bytes` (413), or not one of the accepted formats;
- longer than `max_seconds`: read from the header before anything is decoded (a WAV's declared data size, a
  FLAC's STREAMINFO sample count, libsndfile's frame count), and decoding stops one block past the limit
  whatever the header says, so a lying header costs no more than max_seconds of work;
- a sample rate outside MIN_RATE..MAX_RATE (8-48 kHz): inside it, the audio is resampled to 16 kHz with
  lmstack.multimodal.audio.resample (band-limited polyphase); more than MAX_CHANNELS channels;
- data libsndfile cannot decode (corrupt), non-finite samples (a float WAV with NaN or inf); a file cut short
  keeps what decodes, as a player would play it;
- shorter than MIN_SECONDS, or silent: a peak below SILENCE_PEAK (1e-3 of full scale, -60 dBFS).
Channels are averaged into mono.

Usage:
    from lmstack.serve.audio_input import AudioLimits, decode_audio
    samples = decode_audio(open("speech.flac", "rb").read(), "speech.flac", max_seconds=60, max_bytes=25 << 20)
    limits = AudioLimits(max_seconds=30)          # what `lmstack serve --max_audio_seconds 30` sets
    samples = limits.decode(data, filename)       # float32, mono, 16 kHz, peak >= SILENCE_PEAK
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from lmstack.errors import LmstackError
from lmstack.multimodal.audio import SAMPLE_RATE, resample

ACCEPTED = "WAV, FLAC or MP3"
MIN_RATE, MAX_RATE = 8_000, 48_000
"""Sample rates resampled to 16 kHz; outside this range an upload is refused (below 8 kHz speech has lost the
band the recognizer reads; above 48 kHz is no speech recording)."""
MAX_CHANNELS = 8
MIN_SECONDS = 0.1
"""Shorter uploads are refused: the recognizer's first feature frame needs 25 ms, a word far more."""
SILENCE_PEAK = 1e-3
"""An upload whose loudest sample is below this (-60 dBFS) is refused as silent."""
_BLOCK = 1 << 16  # frames decoded per step, so the read stops soon after max_seconds whatever the header says
_UNKNOWN_SIZE = (0, 0xFFFFFFFF)  # a WAV written to a pipe declares its data size as 0 or -1: unknown, not huge


class AudioRejected(LmstackError):
    """An upload the server refuses; `status` is the HTTP status it is answered with (400, or 413 for size)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def sniff_format(data: bytes) -> str | None:
    """WAV, FLAC or MP3 from the first bytes, or None for anything else."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:3] == b"ID3":
        return "MP3"
    # an MPEG audio frame: 11 sync bits, then version and layer; layer bits 00 are reserved (and AAC's ADTS)
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and (data[1] >> 1) & 0x3:
        return "MP3"
    return None


def _describe(data: bytes) -> str:
    """A short name for what a refused upload looks like, so the client learns what it sent."""
    for magic, name in ((b"OggS", "an OGG file"), (b"\x89PNG", "a PNG picture"), (b"\xff\xd8\xff", "a JPEG picture"),
                        (b"%PDF", "a PDF"), (b"PK\x03\x04", "a ZIP archive"),
                        (b"\x1aE\xdf\xa3", "a WebM/Matroska file")):
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return "an MP4/M4A file"
    head = data[:512]
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unrecognised bytes"


def wav_declared_seconds(data: bytes) -> float | None:
    """The length a RIFF/WAVE header declares (its data chunk size over the byte rate), or None when it declares
    none (a streamed WAV's 0 / 0xFFFFFFFF) or the chunks before the data cannot be walked."""
    if data[:4] != b"RIFF":
        return None
    pos, byte_rate = 12, None
    for _ in range(64):  # a real file has a handful of chunks before its data
        if pos + 8 > len(data):
            return None
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"fmt " and size >= 16 and pos + 24 <= len(data):
            byte_rate = struct.unpack("<I", data[pos + 16:pos + 20])[0]  # nAvgBytesPerSec
        elif chunk == b"data":
            if size in _UNKNOWN_SIZE or not byte_rate:
                return None
            return size / byte_rate
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _read_bounded(f: sf.SoundFile, kind: str, limit: int) -> tuple[list[np.ndarray], int]:
    """(mono blocks, frames) decoded from `f`, stopping once `limit` frames are read."""
    blocks, total = [], 0
    while total < limit:
        # NaN-filled: a FLAC or MP3 stream that declares no length (or a shorter one) ends in a failed seek
        # *after* libsndfile decoded the block (soundfile re-seeks past each read), which loses the count;
        # these decoders give finite samples only, so the decoded frames are the block's finite prefix.
        out = np.full((min(_BLOCK, limit - total), f.channels), np.nan, np.float32)
        try:
            n, last = len(f.read(len(out), dtype="float32", always_2d=True, out=out)), False
        except sf.LibsndfileError:
            finite = np.isfinite(out).all(axis=1)
            if kind == "WAV" or not finite[0]:
                raise  # nothing decoded: really corrupt
            n, last = (int(np.argmin(finite)) if not finite.all() else len(out)), True
        if n == 0:
            break
        blocks.append(out[:n].mean(axis=1))
        total += n
        if last:
            break
    return blocks, total


def _check_length(seconds: float, max_seconds: float, where: str, rule: str) -> None:
    if seconds > max_seconds:
        raise AudioRejected(f"the audio is {seconds:.1f} s long ({where}); this server takes at most "
                            f"{max_seconds:g} s ({rule})")


def decode_audio(data: bytes, filename: str | None = None, max_seconds: float = 60.0,
                 max_bytes: int = 25 << 20, seconds_rule: str = "--max_audio_seconds") -> np.ndarray:
    """Uploaded bytes -> float32 mono samples at 16 kHz, or AudioRejected naming the problem (see the module);
    `seconds_rule` is what a too-long refusal names as the source of max_seconds."""
    name = f" ({filename})" if filename else ""
    if not data:
        raise AudioRejected(f"the uploaded file{name} is empty (0 bytes); send {ACCEPTED} audio")
    if len(data) > max_bytes:
        raise AudioRejected(f"the uploaded file{name} is {len(data)} bytes; this server takes at most {max_bytes} "
                            "(--max_audio_bytes)", status=413)
    kind = sniff_format(data)
    if kind is None:
        raise AudioRejected(f"the uploaded file{name} is {_describe(data)}, not audio this server reads; send "
                            f"{ACCEPTED} (the format is read from the content, not the name)")
    declared = wav_declared_seconds(data) if kind == "WAV" else None
    if declared is not None:
        _check_length(declared, max_seconds, "as its WAV header declares", seconds_rule)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            if not MIN_RATE <= rate <= MAX_RATE:
                raise AudioRejected(f"the audio's sample rate is {rate} Hz; this server takes {MIN_RATE}-{MAX_RATE} "
                                    f"Hz (resampled to {SAMPLE_RATE} Hz)")
            if channels > MAX_CHANNELS:
                raise AudioRejected(f"the audio has {channels} channels; this server takes at most {MAX_CHANNELS}")
            if 0 < frames < (1 << 62):  # libsndfile's count from the header (FLAC: STREAMINFO), before decoding
                _check_length(frames / rate, max_seconds, "as its WAV data size shows" if kind == "WAV"
                              else f"as its {kind} header declares", seconds_rule)
            blocks, total = _read_bounded(f, kind, int(max_seconds * rate) + 1)
    except AudioRejected:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioRejected(f"the uploaded {kind} file{name} cannot be decoded (corrupt): "
                            f"{str(e).split(': ')[-1]}") from None
    if total / rate > max_seconds:
        raise AudioRejected(f"the audio is over {max_seconds:g} s long (decoding stopped there; its header "
                            f"declares no length); this server takes at most {max_seconds:g} s ({seconds_rule})")
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if len(samples) < MIN_SECONDS * rate:
        raise AudioRejected(f"the audio is {len(samples) / rate:.3f} s long; this server needs at least "
                            f"{MIN_SECONDS:g} s")
    if not np.isfinite(samples).all():
        raise AudioRejected("the audio holds NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise AudioRejected(f"the audio is silent: its loudest sample is {peak:.2e} of full scale, below "
                            f"{SILENCE_PEAK:g} (-60 dBFS)")
    return resample(samples, rate, SAMPLE_RATE)


@dataclass
class AudioLimits:
    max_seconds: float = 60.0
    """Longest upload, in seconds, checked from its header before decoding (400 above)."""
    max_bytes: int = 25 << 20
    """Largest upload, in bytes (413 above); OpenAI's limit is 25 MB."""

    def __post_init__(self) -> None:
        if isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, (int, float)) \
                or not 0 < self.max_seconds <= 3600:
            raise ValueError(f"max_audio_seconds={self.max_seconds!r} is not allowed; give seconds in (0, 3600]")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_audio_bytes={self.max_bytes!r} is not allowed; give an integer >= 1")

    def decode(self, data: bytes, filename: str | None = None, model_seconds: float | None = None) -> np.ndarray:
        """decode_audio under these limits; `model_seconds`, the longest input a model takes, lowers max_seconds
        (and the refusal then names the model's limit)."""
        if model_seconds is not None and model_seconds < self.max_seconds:
            return decode_audio(data, filename, model_seconds, self.max_bytes, "the longest input of this model")
        return decode_audio(data, filename, self.max_seconds, self.max_bytes)
