"""Text to speech with espeak-ng through ctypes: the synthetic voice behind the speech world (speech_world.py).

The library and its voice data come from the `espeakng-loader` wheel (pip install espeakng-loader), which ships
libespeak-ng.so and espeak-ng-data; nothing is read from the system. espeak-ng keeps one global state (voice,
rate, pitch, callback), so every call holds a module lock: set the parameters, synthesise, collect the PCM.
Synchronous mode hands the samples to a callback as they are made; the callback appends them to a list.
espeak-ng speaks at 22,050 Hz; synthesize resamples to 16 kHz (lmstack.multimodal.audio.resample), the rate
the speech models read. espeak-ng carries synthesis state from one call to the next (the same text twice in a
process differs by up to ~1 % in length, and espeak_Terminate does not reset it), so each call runs in a forked
child that has synthesised nothing before (~30 ms): the same text and parameters give the same samples.

What is refused, each with an LmstackError naming the problem: empty text, a rate outside 80..450 words per
minute, pitch or pitch_range outside 0..100, a voice espeak-ng does not know, a missing espeakng-loader.

Usage:
    from lmstack.multimodal.espeak import synthesize, available
    if available():
        samples, rate = synthesize("Ada was born in Amberhaven.", voice="en-us", rate=200, pitch=70)
        # samples: float32 mono in [-1, 1]; rate == 16000
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading

import numpy as np

from lmstack.errors import LmstackError
from lmstack.multimodal.audio import SAMPLE_RATE, resample

try:
    import espeakng_loader
except ModuleNotFoundError:  # an optional extra: available() says so and synthesize names the install command
    espeakng_loader = None

INSTALL = "pip install espeakng-loader"
RATE_RANGE = (80, 450)
"""Words per minute espeak-ng accepts (its own limits)."""
PITCH_RANGE = (0, 100)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_lock = threading.Lock()
_state: dict = {}  # lib, native rate, the callback object (kept alive), the chunk list it fills


def available() -> bool:
    """True when espeak-ng loads and initialises here."""
    try:
        _load()
    except LmstackError:
        return False
    return True


def _load() -> dict:
    """Load and initialise libespeak-ng once (call under _lock or before any other thread uses it)."""
    if _state:
        return _state
    if espeakng_loader is None:
        raise LmstackError(f"espeak-ng is not installed; run: {INSTALL}")
    try:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path()
    except (OSError, RuntimeError) as err:
        raise LmstackError(f"espeak-ng could not be loaded ({err}); reinstall with: {INSTALL}") from None
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    native = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
    if native <= 0:
        raise LmstackError(f"espeak-ng failed to initialise with data at {data} (returned {native})")
    chunks: list[np.ndarray] = []

    def collect(wav, n, _events):
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = go on synthesising

    callback = _CALLBACK(collect)
    lib.espeak_SetSynthCallback(callback)
    _state.update(lib=lib, native=native, callback=callback, chunks=chunks)
    return _state


def _check(text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> None:
    if not isinstance(text, str) or not text.strip():
        raise LmstackError("text to synthesise is empty")
    if not isinstance(voice, str) or not voice:
        raise LmstackError(f"voice must be a non-empty string, got {voice!r}")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise LmstackError(f"rate {rate} is outside {RATE_RANGE[0]}..{RATE_RANGE[1]} words per minute")
    for name, value in (("pitch", pitch), ("pitch_range", pitch_range)):
        if not PITCH_RANGE[0] <= value <= PITCH_RANGE[1]:
            raise LmstackError(f"{name} {value} is outside {PITCH_RANGE[0]}..{PITCH_RANGE[1]}")


def _synth_native(text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> tuple[np.ndarray, int]:
    """Synthesise in this process -> (int16 PCM, espeak-ng's native rate). Caller holds _lock."""
    st = _load()
    lib, chunks = st["lib"], st["chunks"]
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise LmstackError(f"espeak-ng has no voice named {voice!r} (try en, en-us, en-gb-x-rp)")
    for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, 100)):
        lib.espeak_SetParameter(param, int(value), 0)
    chunks.clear()
    raw = text.encode("utf-8") + b"\0"
    err = lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    chunks.clear()
    if err != 0:
        raise LmstackError(f"espeak-ng failed to synthesise {text[:40]!r} (error {err})")
    return pcm.astype(np.int16), int(st["native"])


def _synth_forked(text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> tuple[np.ndarray, int]:
    """Synthesise in a forked child, so every call starts from espeak-ng's freshly initialised state.

    espeak-ng keeps synthesis state (waveform phase, counters) from one call to the next, and espeak_Terminate
    does not clear it: the same text twice in one process differs by up to ~1 % in length. A child that has
    synthesised nothing before gives the same samples every time; a fork costs ~30 ms.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: synthesise, send b"OK"+rate+PCM or b"ER"+message, exit without Python cleanup
        status = 1
        try:
            with os.fdopen(write_fd, "wb") as pipe:
                try:
                    pcm, native = _synth_native(text, voice, rate, pitch, pitch_range)
                    pipe.write(b"OK" + struct.pack("<i", native) + pcm.tobytes())
                except LmstackError as err:
                    pipe.write(b"ER" + str(err).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, code = os.waitpid(pid, 0)
    if data[:2] == b"ER":
        raise LmstackError(data[2:].decode())
    if data[:2] != b"OK" or code != 0:
        raise LmstackError(f"the espeak-ng worker process failed (exit status {code})")
    return np.frombuffer(data[6:], dtype=np.int16), struct.unpack("<i", data[2:6])[0]


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> tuple[np.ndarray, int]:
    """Speak `text` -> (float32 mono samples in [-1, 1], 16000). Thread-safe; the same arguments give the same
    samples (where os.fork exists; elsewhere in-process, equal up to espeak-ng's carried state)."""
    _check(text, voice, rate, pitch, pitch_range)
    with _lock:
        if hasattr(os, "fork"):
            if espeakng_loader is None:
                raise LmstackError(f"espeak-ng is not installed; run: {INSTALL}")
            pcm, native = _synth_forked(text, voice, rate, pitch, pitch_range)
        else:
            pcm, native = _synth_native(text, voice, rate, pitch, pitch_range)
    samples = pcm.astype(np.float32) / 32768.0
    if native != SAMPLE_RATE:
        samples = resample(samples, native, SAMPLE_RATE)
    return samples.astype(np.float32), SAMPLE_RATE


__all__ = ["synthesize", "available", "INSTALL", "RATE_RANGE", "PITCH_RANGE"]
