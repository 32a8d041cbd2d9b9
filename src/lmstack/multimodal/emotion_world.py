"""The emotion-proxy world: PROSODY CLASSIFICATION plus LEXICAL SENTIMENT, not emotion recognition in real speech.

Each example is a voice note with a typed message: the voice (espeak-ng, espeak.py) reads one fact sentence of
the text world ("Ada Ashford works for Pulse Pharma."); the message is that sentence with an appraisal phrase
around it ("Sadly, Ada Ashford works for Pulse Pharma."). The four classes are the quadrants of the
valence-arousal circumplex, and each modality carries one axis by construction:
- arousal (high / low) is only in the AUDIO: high = a fast, high, wide-pitched espeak-ng bundle, low = a slow,
  low, flat one. It is a rate / pitch setting of a synthesiser, nothing a person felt.
- valence (positive / negative) is only in the TEXT: the appraisal phrase. The voice reads the bare fact, so the
  audio holds no appraisal word (a design choice: otherwise an audio model could read valence off the words).
Classes: excited (high, positive), tense (high, negative), content (low, positive), sad (low, negative).

Each modality is imperfect on its own, on purpose, and every record says how:
- P_TEXT_CUE of messages carry an appraisal (`cue`, `cue_valence`); the rest are the bare fact (`cue` null), so
  their valence is unknowable from the text. A third of the appraisals are negated ("Not great news: ...",
  "Not bad news: ..."): a bag of words sees "great" in a negative message (`cue_negated`).
- P_AUDIO_CUE of utterances use their arousal's bundle; the rest use the neutral bundle (`prosody` "neutral"),
  so their arousal is unknowable from the audio. Bundles are jittered per utterance (Gaussian, PROSODY_SD),
  so the high and low ranges overlap in each of rate, pitch and pitch range.
- test_noisy: the test split's audio with white noise at speech_world.NOISE_SNR_DB (10 dB), same messages.
So with perfect cue reading, audio-only and text-only top out near 0.45 and both near 0.79 (ceilings()).

Splits: train / val / test (80/10/10 by example) and test_noisy. The same seed gives byte-identical files.

Usage:
    from lmstack.multimodal.emotion_world import build_emotion_world, write_emotion_world, load_emotion_split
    records = build_emotion_world(n=40, seed=0)        # dicts: text, spoken, cue, prosody, arousal, valence, label
    manifest = write_emotion_world("data/emotion", 40, seed=0)  # audio/<split>/<id>.wav, <split>.jsonl, manifest
    pairs = load_emotion_split("data/emotion", "test")           # [(record, float32 16 kHz samples), ...]
    lmstack data synth-emotion --out data/emotion --n 600
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from lmstack.config import atomic_write_bytes
from lmstack.errors import LmstackError
from lmstack.model.load_guard import read_json
from lmstack.multimodal.audio import SAMPLE_RATE, read_wav
from lmstack.multimodal.espeak import PITCH_RANGE, RATE_RANGE
from lmstack.multimodal.speech_world import NOISE_SNR_DB, VOICES, write_utterances
from lmstack.world import World
from lmstack.world.entities import PERSON_ATTRIBUTES
from lmstack.world.qa import answer_sentence

CLASSES = ("excited", "tense", "content", "sad")
QUADRANT = {"excited": ("high", "positive"), "tense": ("high", "negative"),
            "content": ("low", "positive"), "sad": ("low", "negative")}
PROSODY = {"high": (215, 66, 75), "low": (145, 34, 28), "neutral": (180, 50, 50)}
"""Bundle -> centre (rate wpm, pitch 0..100, pitch_range 0..100)."""
PROSODY_SD = (24, 9, 16)
"""Per-utterance Gaussian jitter of (rate, pitch, pitch_range): about 1/3 of the high-low gap, so ranges overlap."""
P_TEXT_CUE = 0.75
P_AUDIO_CUE = 0.8
P_NEGATED = 1 / 3
CUES = {  # template -> message; {s} is the fact sentence (it starts with a name)
    "positive": [("Great news: {s}", False), ("Good news: {s}", False), ("Happily, {s}", False),
                 ("{s} It is a wonderful thing.", False), ("I am so glad that {s}", False), ("{s} I love it.", False)],
    "negative": [("Bad news: {s}", False), ("Terrible news: {s}", False), ("Sadly, {s}", False),
                 ("{s} It is a shame.", False), ("I am so upset that {s}", False), ("{s} I hate it.", False)],
}
NEGATED = {  # a plain template of the other valence with "not" in it: the same words, so for a bag of words
    # (word counts, no order) the four "(not) great/bad"-style variants are an XOR no linear model separates
    "positive": [("Not bad news: {s}", True), ("{s} It is not a shame.", True), ("I am not upset that {s}", True)],
    "negative": [("Not great news: {s}", True), ("{s} It is not a wonderful thing.", True),
                 ("I am not glad that {s}", True)],
}
SPLITS = ("train", "val", "test", "test_noisy")
MAX_EXAMPLES = 100_000


def ceilings(p_text: float = P_TEXT_CUE, p_audio: float = P_AUDIO_CUE) -> dict:
    """Best accuracy each view can reach if it reads its cue perfectly (an unknown axis is a coin flip)."""
    one = p_text * (1 - p_audio) + (1 - p_text) * p_audio  # one axis known, the other a coin flip
    both = p_text * p_audio + 0.5 * one + 0.25 * (1 - p_text) * (1 - p_audio)
    return {"text": 0.5 * p_text + 0.25 * (1 - p_text), "audio": 0.5 * p_audio + 0.25 * (1 - p_audio), "both": both,
            "majority": 0.25}


def _appraise(rng: random.Random, fact: str, valence: str) -> tuple[str, str | None, bool]:
    """(message, cue template or None, negated)."""
    if rng.random() >= P_TEXT_CUE:
        return fact, None, False
    template, negated = rng.choice(NEGATED[valence] if rng.random() < P_NEGATED else CUES[valence])
    return template.format(s=fact), template, negated


def _prosody(rng: random.Random, arousal: str) -> tuple[str, int, int, int]:
    bundle = arousal if rng.random() < P_AUDIO_CUE else "neutral"
    rate, pitch, prange = (round(rng.gauss(c, sd)) for c, sd in zip(PROSODY[bundle], PROSODY_SD))
    return (bundle, min(max(rate, RATE_RANGE[0]), RATE_RANGE[1]), min(max(pitch, PITCH_RANGE[0]), PITCH_RANGE[1]),
            min(max(prange, PITCH_RANGE[0]), PITCH_RANGE[1]))


def build_emotion_world(n: int, seed: int = 0) -> list[dict]:
    """The records (no audio), classes balanced by a uniform draw; every label and cue is kept truthfully."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_EXAMPLES:
        raise LmstackError(f"n must be an integer in 1..{MAX_EXAMPLES}, got {n!r}")
    rng = random.Random(seed)
    world = World(seed=seed, n_people=max(20, min(n, 500)), n_cities=10, n_countries=3, n_companies=8,
                  n_universities=5)
    records = []
    for i in range(n):
        label = rng.choice(CLASSES)
        arousal, valence = QUADRANT[label]
        fact = answer_sentence(rng.choice(world.people), rng.choice(PERSON_ATTRIBUTES))
        text, cue, negated = _appraise(rng, fact, valence)
        bundle, rate, pitch, prange = _prosody(rng, arousal)
        u = rng.random()
        split = "train" if u < 0.8 else "val" if u < 0.9 else "test"
        records.append({"id": f"e{i:06d}", "split": split, "label": label, "label_id": CLASSES.index(label),
                        "arousal": arousal, "valence": valence, "text": text, "spoken": fact, "cue": cue,
                        "cue_valence": valence if cue else None, "cue_negated": negated,
                        "voice": rng.choice(VOICES), "prosody": bundle, "rate": rate, "pitch": pitch,
                        "pitch_range": prange})
    return records


def write_emotion_world(out: str | Path, n: int, seed: int = 0) -> dict:
    """Synthesise every record; write audio/<split>/<id>.wav, <split>.jsonl (4 splits), manifest.json last."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"cannot write the emotion world to {out}: it is a file, not a directory")
    # the voice reads only the bare fact ("spoken"); test also gets a noisy copy, same message and labels
    by_split, seconds = write_utterances(out, build_emotion_world(n, seed), SPLITS, seed, spoken_key="spoken")
    manifest = {"n": n, "seed": seed, "sample_rate": SAMPLE_RATE, "classes": list(CLASSES),
                "quadrant": {k: list(v) for k, v in QUADRANT.items()},
                "prosody": {k: dict(zip(("rate", "pitch", "pitch_range"), v)) for k, v in PROSODY.items()},
                "prosody_sd": list(PROSODY_SD), "p_text_cue": P_TEXT_CUE, "p_audio_cue": P_AUDIO_CUE,
                "p_negated": P_NEGATED, "noise_snr_db": NOISE_SNR_DB, "ceilings": ceilings(),
                "counts": {s: len(r) for s, r in by_split.items()}, "seconds": round(seconds, 2),
                "note": "prosody classification (a synthesiser's rate/pitch) plus lexical sentiment (appraisal "
                        "phrases); not emotion in real speech"}
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def synth_emotion(out: str = "data/emotion", n: int = 600, seed: int = 0) -> None:
    """Generate the emotion-proxy world: spoken facts with prosody arousal and typed messages with valence.

    Args:
        out: Output folder; gets audio/<split>/<id>.wav, <split>.jsonl (train, val, test, test_noisy),
            manifest.json.
        n: Number of utterances (at least 1); test ones also get a 10 dB noisy copy.
        seed: Random seed; the same seed gives byte-identical files.
    """
    manifest = write_emotion_world(out, n, seed)
    counts = ", ".join(f"{s} {k}" for s, k in manifest["counts"].items())
    print(f"wrote {n} utterances ({manifest['seconds']:.1f} s of speech) to {out}: {counts} "
          f"(prosody classification plus lexical sentiment, not emotion in real speech)")


def load_emotion_split(root: str | Path, split: str) -> list[tuple[dict, np.ndarray]]:
    """[(record, float32 samples at 16 kHz)] of one split of a world write_emotion_world wrote."""
    root = Path(root)
    if split not in SPLITS:
        raise LmstackError(f"split={split!r} is not an emotion-world split; choose one of {', '.join(SPLITS)}")
    if not (root / "manifest.json").is_file():
        raise LmstackError(f"{root} is not an emotion world: manifest.json is missing (written last; an "
                           "interrupted write leaves none)")
    read_json(root, "manifest.json", "emotion-world manifest", want_object=True)
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise LmstackError(f"{root} has no {split}.jsonl")
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
            wav = (root / rec["audio"]).resolve()
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LmstackError(f"{path}:{line_no} is not an emotion record ({err})") from None
        if root.resolve() not in wav.parents:
            raise LmstackError(f"{path}:{line_no}: audio path {rec['audio']!r} leaves the world directory")
        samples, rate = read_wav(wav.read_bytes())
        if rate != SAMPLE_RATE:
            raise LmstackError(f"{wav} is {rate} Hz; the emotion world is {SAMPLE_RATE} Hz")
        out.append((rec, samples))
    return out


__all__ = ["build_emotion_world", "write_emotion_world", "synth_emotion", "load_emotion_split", "ceilings", "CLASSES", "QUADRANT",
           "PROSODY", "PROSODY_SD", "P_TEXT_CUE", "P_AUDIO_CUE", "P_NEGATED", "CUES", "NEGATED", "SPLITS"]
