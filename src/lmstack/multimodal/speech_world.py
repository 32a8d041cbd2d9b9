"""The speech world: spoken sentences from the synthetic text world, made with espeak-ng (espeak.py).

Each utterance speaks one fact sentence of the text world (qa.answer_sentence: "Ada Ashford was born in
Amberhaven.") or one number ("4217", which espeak-ng reads as words), in one of several voices (en, en-us,
en-gb-x-rp) with a prosody bundle. A record keeps the transcript and every label: voice, rate, pitch,
pitch_range, prosody class, text kind.

Prosody classes ("emotion proxy"). The classes are PROSODY BUNDLES, not emotions: calm = slow, low pitch, narrow
range; excited = fast, high pitch, wide range; sad = slowest, lowest, flat; neutral = espeak-ng's defaults. A
model that learns them learns to classify speaking rate and pitch contour; nothing here says it recognises
emotion in real speech. Each bundle is jittered a little per utterance, never across into another bundle.
The text world has no sentiment labels, so each record's `sentiment` is null (said here so nobody reads the
field as "neutral").

Splits: train / val / test (80/10/10 by utterance) plus two robustness copies of test with the same transcripts:
test_noisy (white noise at NOISE_SNR_DB) and test_reverb (the audio convolved with a synthetic room impulse:
exponentially decaying noise, RT60 REVERB_RT60 seconds). The same seed gives byte-identical files (espeak.py
synthesises each utterance from a fresh state; the noise and rooms come from a seeded numpy generator).

Usage:
    from lmstack.multimodal.speech_world import build_speech_world, write_speech_world, add_noise, add_reverb
    records = build_speech_world(n_utterances=40, seed=0)       # dicts with text, voice, rate, pitch, split, ...
    manifest = write_speech_world("data/speech", 40, seed=0)    # audio/<split>/<id>.wav, <split>.jsonl, manifest.json
    lmstack data synth-speech --out data/speech --n_utterances 200 --seed 0
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve

from lmstack.config import atomic_write_bytes
from lmstack.errors import LmstackError
from lmstack.multimodal.audio import SAMPLE_RATE, write_wav
from lmstack.multimodal.espeak import synthesize
from lmstack.world import World
from lmstack.world.entities import PERSON_ATTRIBUTES
from lmstack.world.qa import answer_sentence

VOICES = ("en", "en-us", "en-gb-x-rp")
PROSODY = {  # class -> (rate wpm, pitch 0..100, pitch_range 0..100); calm/sad differ in every field
    "neutral": (175, 50, 50),
    "calm": (140, 38, 25),
    "excited": (240, 75, 90),
    "sad": (110, 22, 4),
}
JITTER = (8, 4, 4)
"""Largest per-utterance change of (rate, pitch, pitch_range); half the smallest gap between bundles."""
SPLITS = ("train", "val", "test", "test_noisy", "test_reverb")
NOISE_SNR_DB = 10.0
REVERB_RT60 = 0.4
MAX_UTTERANCES = 100_000


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise scaled so that signal power / noise power is exactly 10^(snr_db/10)."""
    x = np.asarray(samples, dtype=np.float64)
    power = float(np.mean(x ** 2))
    if power == 0.0:
        raise LmstackError("cannot set an SNR on silent audio (signal power is 0)")
    noise = rng.standard_normal(x.shape)
    noise *= np.sqrt(power / 10 ** (snr_db / 10) / np.mean(noise ** 2))
    return (x + noise).astype(np.float32)


def room_impulse(rt60: float, rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room: a direct path then noise decaying 60 dB over rt60 seconds, unit energy."""
    if not 0.05 <= rt60 <= 3.0:
        raise LmstackError(f"rt60 {rt60} is outside 0.05..3.0 seconds")
    t = np.arange(int(rt60 * rate)) / rate
    ir = rng.standard_normal(t.size) * np.exp(-6.9078 * t / rt60) * 0.3  # 6.9078 = ln(1000): -60 dB at rt60
    ir[0] = 1.0
    return ir / np.sqrt(np.sum(ir ** 2))


def add_reverb(samples: np.ndarray, rng: np.random.Generator, rt60: float = REVERB_RT60) -> np.ndarray:
    """Convolve with room_impulse, keep the original length, rescale to the original peak."""
    x = np.asarray(samples, dtype=np.float64)
    y = fftconvolve(x, room_impulse(rt60, rng))[: x.size]
    peak, ypeak = float(np.max(np.abs(x))), float(np.max(np.abs(y)))
    return (y * (peak / ypeak if ypeak > 0 else 1.0)).astype(np.float32)


def _texts(rng: random.Random, n: int, seed: int) -> list[tuple[str, str]]:
    """n (kind, text) pairs: about 3 in 4 fact sentences, the rest numbers."""
    world = World(seed=seed, n_people=max(20, min(n, 500)), n_cities=10, n_countries=3, n_companies=8,
                  n_universities=5)
    out = []
    for _ in range(n):
        if rng.random() < 0.75:
            out.append(("fact", answer_sentence(rng.choice(world.people), rng.choice(PERSON_ATTRIBUTES))))
        else:
            out.append(("number", str(rng.randint(0, 9999))))
    return out


def build_speech_world(n_utterances: int, seed: int = 0) -> list[dict]:
    """The records (no audio): id, split, text, kind, voice, prosody, rate, pitch, pitch_range, sentiment."""
    if not isinstance(n_utterances, int) or not 1 <= n_utterances <= MAX_UTTERANCES:
        raise LmstackError(f"n_utterances must be an integer in 1..{MAX_UTTERANCES}, got {n_utterances!r}")
    rng = random.Random(seed)
    records = []
    classes = sorted(PROSODY)
    for i, (kind, text) in enumerate(_texts(rng, n_utterances, seed)):
        prosody = rng.choice(classes)
        rate, pitch, prange = (v + rng.randint(-j, j) for v, j in zip(PROSODY[prosody], JITTER))
        u = rng.random()  # the split by utterance: 80/10/10
        split = "train" if u < 0.8 else "val" if u < 0.9 else "test"
        records.append({"id": f"u{i:06d}", "split": split, "text": text, "kind": kind, "voice": rng.choice(VOICES),
                        "prosody": prosody, "rate": rate, "pitch": max(0, pitch), "pitch_range": max(0, prange),
                        "sentiment": None})
    return records


def write_utterances(out: Path, records: list[dict], splits: tuple[str, ...], seed: int,
                     spoken_key: str = "text") -> tuple[dict[str, list[dict]], float]:
    """Synthesise each record's `spoken_key` into audio/<split>/<id>.wav and write <split>.jsonl for `splits`.
    A test record also gets the robustness copies `splits` names (test_noisy, test_reverb): same text and labels,
    degraded audio from one generator seeded by `seed`. Returns (records by split, seconds of clean speech)."""
    nrng = np.random.default_rng(seed)
    by_split: dict[str, list[dict]] = {s: [] for s in splits}
    seconds = 0.0
    for rec in records:
        samples, rate = synthesize(rec[spoken_key], rec["voice"], rec["rate"], rec["pitch"], rec["pitch_range"])
        variants = [(rec["split"], samples, {})]
        if rec["split"] == "test":
            if "test_noisy" in by_split:
                variants.append(("test_noisy", add_noise(samples, NOISE_SNR_DB, nrng), {"snr_db": NOISE_SNR_DB}))
            if "test_reverb" in by_split:
                variants.append(("test_reverb", add_reverb(samples, nrng), {"rt60": REVERB_RT60}))
        for split, audio, extra in variants:
            rel = f"audio/{split}/{rec['id']}.wav"
            atomic_write_bytes(out / rel, write_wav(audio, rate))
            by_split[split].append({**rec, "split": split, "audio": rel, "sample_rate": rate,
                                    "seconds": round(audio.size / rate, 4), **extra})
        seconds += samples.size / rate
    for split, recs in by_split.items():
        atomic_write_bytes(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
    return by_split, seconds


def write_speech_world(out: str | Path, n_utterances: int, seed: int = 0) -> dict:
    """Synthesise every record; write audio/<split>/<id>.wav, <split>.jsonl (5 splits) and manifest.json."""
    out = Path(out)
    by_split, seconds = write_utterances(out, build_speech_world(n_utterances, seed), SPLITS, seed)
    manifest = {"n_utterances": n_utterances, "seed": seed, "sample_rate": SAMPLE_RATE, "voices": list(VOICES),
                "prosody": {k: dict(zip(("rate", "pitch", "pitch_range"), v)) for k, v in PROSODY.items()},
                "counts": {s: len(r) for s, r in by_split.items()}, "seconds": round(seconds, 2),
                "noise_snr_db": NOISE_SNR_DB, "reverb_rt60": REVERB_RT60,
                "note": "prosody classes are rate/pitch bundles, not emotions; the text world has no sentiment"}
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def synth_speech(out: str = "data/speech", n_utterances: int = 200, seed: int = 0) -> None:
    """Generate the speech world with espeak-ng (WAVs plus transcripts, voice and prosody labels).

    Args:
        out: Output folder; gets audio/<split>/<id>.wav, <split>.jsonl (train, val, test, test_noisy, test_reverb),
            manifest.json.
        n_utterances: Number of utterances (at least 1); test ones also get a noisy and a reverberant copy.
        seed: Random seed; the same seed gives byte-identical files.
    """
    manifest = write_speech_world(out, n_utterances, seed)
    counts = ", ".join(f"{s} {n}" for s, n in manifest["counts"].items())
    print(f"wrote {n_utterances} utterances ({manifest['seconds']:.1f} s of speech) to {out}: {counts}")


__all__ = ["build_speech_world", "write_speech_world", "write_utterances", "synth_speech", "add_noise", "add_reverb", "room_impulse",
           "VOICES", "PROSODY", "SPLITS", "NOISE_SNR_DB", "REVERB_RT60"]
