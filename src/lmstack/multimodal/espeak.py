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
        samples, rate, words = synthesize_with_words("Ada was born.", voice="en")  # + [(word, start_s, end_s)]
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
SILENCE = 0.01
"""Peak amplitude under which a 10 ms frame counts as silence (word ends, speech_end)."""

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1  # espeak_EVENT_TYPE


class _Event(ctypes.Structure):
    """espeak-ng's espeak_EVENT (speak_lib.h); the callback gets an array of them ended by type 0."""
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]

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
    words: list[tuple[int, int, int]] = []  # (text_position, length, audio_position ms), filled when asked

    def collect(wav, n, events):
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        if _state.get("want_words") and events:
            event = ctypes.cast(events, ctypes.POINTER(_Event))
            i = 0
            while event[i].type != _EVENT_LIST_TERMINATED:
                if event[i].type == _EVENT_WORD:
                    words.append((int(event[i].text_position), int(event[i].length), int(event[i].audio_position)))
                i += 1
        return 0  # 0 = go on synthesising

    callback = _CALLBACK(collect)
    lib.espeak_SetSynthCallback(callback)
    _state.update(lib=lib, native=native, callback=callback, chunks=chunks, words=words, want_words=False)
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


def _synth_native(text: str, voice: str, rate: int, pitch: int, pitch_range: int, words: bool = False
                  ) -> tuple[np.ndarray, int, list[tuple[int, int, int]]]:
    """Synthesise in this process -> (int16 PCM, espeak-ng's native rate, word events). The word events
    (text_position 1-based, length in characters, audio_position ms) are collected only when `words` is set
    (otherwise the list is empty). Caller holds _lock."""
    st = _load()
    lib, chunks, events = st["lib"], st["chunks"], st["words"]
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise LmstackError(f"espeak-ng has no voice named {voice!r} (try en, en-us, en-gb-x-rp)")
    for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, 100)):
        lib.espeak_SetParameter(param, int(value), 0)
    chunks.clear()
    events.clear()
    st["want_words"] = words
    raw = text.encode("utf-8") + b"\0"
    try:
        err = lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    finally:
        st["want_words"] = False
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    found = list(events)
    chunks.clear()
    events.clear()
    if err != 0:
        raise LmstackError(f"espeak-ng failed to synthesise {text[:40]!r} (error {err})")
    return pcm.astype(np.int16), int(st["native"]), found


def _synth_forked(text: str, voice: str, rate: int, pitch: int, pitch_range: int, words: bool = False
                  ) -> tuple[np.ndarray, int, list[tuple[int, int, int]]]:
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
                    pcm, native, events = _synth_native(text, voice, rate, pitch, pitch_range, words)
                    flat = [v for event in events for v in event]
                    pipe.write(b"OK" + struct.pack(f"<ii{len(flat)}i", native, len(events), *flat) + pcm.tobytes())
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
    native, n_events = struct.unpack("<ii", data[2:10])
    head = 10 + 12 * n_events
    flat = struct.unpack(f"<{3 * n_events}i", data[10:head])
    events = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
    return np.frombuffer(data[head:], dtype=np.int16), native, events


def _synth(text: str, voice: str, rate: int, pitch: int, pitch_range: int, words: bool
           ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """16 kHz float32 samples and espeak-ng's word events (empty unless `words`)."""
    _check(text, voice, rate, pitch, pitch_range)
    with _lock:
        if hasattr(os, "fork"):
            if espeakng_loader is None:
                raise LmstackError(f"espeak-ng is not installed; run: {INSTALL}")
            pcm, native, events = _synth_forked(text, voice, rate, pitch, pitch_range, words)
        else:
            pcm, native, events = _synth_native(text, voice, rate, pitch, pitch_range, words)
    samples = pcm.astype(np.float32) / 32768.0
    if native != SAMPLE_RATE:
        samples = resample(samples, native, SAMPLE_RATE)
    return samples.astype(np.float32), events


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> tuple[np.ndarray, int]:
    """Speak `text` -> (float32 mono samples in [-1, 1], 16000). Thread-safe; the same arguments give the same
    samples (where os.fork exists; elsewhere in-process, equal up to espeak-ng's carried state)."""
    samples, _ = _synth(text, voice, rate, pitch, pitch_range, words=False)
    return samples, SAMPLE_RATE


def speech_end(samples: np.ndarray, start: int = 0, stop: int | None = None, threshold: float = SILENCE) -> int:
    """The sample just after the last 10 ms frame of samples[start:stop] whose peak is over `threshold`
    (start when the whole span is silent)."""
    stop = samples.size if stop is None else min(stop, samples.size)
    frame = SAMPLE_RATE // 100
    for end in range(stop, start, -frame):
        if np.abs(samples[max(start, end - frame):end]).max() > threshold:
            return end
    return start


def synthesize_with_words(text: str, voice: str = "en", rate: int = 175, pitch: int = 50, pitch_range: int = 50
                          ) -> tuple[np.ndarray, int, list[tuple[str, float, float]]]:
    """`synthesize` (the same samples) plus each word of `text` (split on whitespace) with its time span:
    (samples, 16000, [(word, start_s, end_s)]).

    start: the audio_position (ms) of espeak-ng's first WORD event inside the word's characters (one text word
    may give several events, e.g. "7815" is read as several words; a text word with no event of its own, such
    as a lone punctuation mark, takes the previous word's end as both start and end).
    end: the next word's start, or the end of the clip for the last word, moved back over the silence before
    it (10 ms frames whose peak is under SILENCE): a pause after a word (a comma, the sentence end) is not part
    of the word. The times are in seconds of the returned 16 kHz samples (espeak-ng counts them at its native
    rate; milliseconds do not change with the resampling).
    """
    samples, events = _synth(text, voice, rate, pitch, pitch_range, words=True)
    spans, pos = [], 0
    for word in text.split():
        first = text.index(word, pos)
        spans.append((word, first, first + len(word)))
        pos = first + len(word)
    starts: list[float | None] = []
    for _, lo, hi in spans:  # text_position is 1-based, in characters
        inside = [ms for tp, _, ms in events if lo <= tp - 1 < hi]
        starts.append(min(inside) / 1000.0 if inside else None)
    duration = samples.size / SAMPLE_RATE
    out: list[tuple[str, float, float]] = []
    for i, (word, _, _) in enumerate(spans):
        start = starts[i]
        if start is None:
            start = out[-1][2] if out else 0.0
            out.append((word, start, start))
            continue
        nxt = next((s for s in starts[i + 1:] if s is not None), duration)
        stop = speech_end(samples, int(round(start * SAMPLE_RATE)), int(round(nxt * SAMPLE_RATE)))
        out.append((word, start, max(start, stop / SAMPLE_RATE)))
    return samples, SAMPLE_RATE, out


__all__ = ["synthesize", "synthesize_with_words", "speech_end", "available", "SILENCE",
           "INSTALL", "RATE_RANGE", "PITCH_RANGE"]
