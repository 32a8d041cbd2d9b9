"""speech_world.py: records and splits, prosody bundles, exact SNR, reverb, the writer and the CLI entry."""
import json

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.multimodal.audio import read_wav
from lmstack.multimodal.espeak import INSTALL, available
from lmstack.multimodal.speech_world import (JITTER, PROSODY, SPLITS, VOICES, add_noise, add_reverb,
                                             build_speech_world, room_impulse, synth_speech, write_speech_world)

needs_espeak = pytest.mark.skipif(not available(), reason=f"espeak-ng cannot load; run: {INSTALL}")


def test_records_deterministic_and_labelled():
    a, b = build_speech_world(60, seed=3), build_speech_world(60, seed=3)
    assert a == b and a != build_speech_world(60, seed=4)
    assert {r["split"] for r in a} == {"train", "val", "test"}
    assert {r["voice"] for r in a} == set(VOICES) and {r["prosody"] for r in a} == set(PROSODY)
    assert {r["kind"] for r in a} == {"fact", "number"}
    for r in a:
        assert r["text"].strip() and r["sentiment"] is None
        base = PROSODY[r["prosody"]]
        assert all(abs(v - b0) <= j for v, b0, j in zip((r["rate"], r["pitch"], r["pitch_range"]), base, JITTER))


def test_prosody_bundles_distinct():
    names = sorted(PROSODY)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            # jittered ranges of two bundles never overlap in rate or in pitch
            gaps = [abs(PROSODY[x][k] - PROSODY[y][k]) > 2 * JITTER[k] for k in (0, 1)]
            assert any(gaps), (x, y)
    assert PROSODY["excited"][0] > PROSODY["neutral"][0] > PROSODY["calm"][0] > PROSODY["sad"][0]
    assert PROSODY["excited"][1] > PROSODY["neutral"][1] > PROSODY["calm"][1] > PROSODY["sad"][1]


def test_noise_snr_is_what_was_asked():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    clean = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for snr in (0.0, 10.0, 20.0):
        noisy = add_noise(clean, snr, rng)
        measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy - clean) ** 2.0))
        assert abs(measured - snr) < 1.0
    with pytest.raises(LmstackError, match="silent"):
        add_noise(np.zeros(100, np.float32), 10.0, rng)


def test_reverb_spreads_energy_in_time():
    rng = np.random.default_rng(1)
    ir = room_impulse(0.4, rng)
    assert ir.size == 6400 and abs(np.sum(ir ** 2) - 1) < 1e-9 and ir[0] == ir.max()
    click = np.zeros(16000, np.float32)
    click[100] = 0.5
    wet = add_reverb(click, rng)
    assert wet.size == click.size and np.isclose(np.abs(wet).max(), 0.5)
    assert np.sum(np.abs(wet[2000:]) > 1e-3) > 500  # a tail after the click
    with pytest.raises(LmstackError, match="rt60"):
        room_impulse(10.0, rng)


@pytest.mark.parametrize("n", [0, -1, 1.5, "3"])
def test_bad_count_named(n):
    with pytest.raises(LmstackError, match="n_utterances"):
        build_speech_world(n)


@needs_espeak
def test_writer_writes_readable_wavs(tmp_path, capsys):
    synth_speech(str(tmp_path / "a"), n_utterances=14, seed=2)
    assert "wrote 14 utterances" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"]["test"] == manifest["counts"]["test_noisy"] == manifest["counts"]["test_reverb"] >= 1
    assert sum(manifest["counts"][s] for s in ("train", "val", "test")) == 14
    records = {s: [json.loads(line) for line in open(tmp_path / "a" / f"{s}.jsonl")] for s in SPLITS}
    for split, recs in records.items():
        for r in recs:
            samples, rate = read_wav((tmp_path / "a" / r["audio"]).read_bytes())
            assert rate == 16000 and r["split"] == split and abs(samples.size / rate - r["seconds"]) < 1e-3
            assert np.abs(samples).max() > 0.05
    clean = {r["id"]: r for r in records["test"]}
    for r in records["test_noisy"]:
        assert r["text"] == clean[r["id"]]["text"] and r["snr_db"] == manifest["noise_snr_db"]
        a, _ = read_wav((tmp_path / "a" / clean[r["id"]]["audio"]).read_bytes())
        b, _ = read_wav((tmp_path / "a" / r["audio"]).read_bytes())
        snr = 10 * np.log10(np.mean(a.astype(np.float64) ** 2) / np.mean((b - a).astype(np.float64) ** 2))
        assert abs(snr - r["snr_db"]) < 1.0  # still the asked SNR after 16-bit WAV rounding
    # same seed -> byte-identical files
    write_speech_world(tmp_path / "b", 14, seed=2)
    for path in (tmp_path / "a").rglob("*.*"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path
