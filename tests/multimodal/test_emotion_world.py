"""emotion_world.py: truthful labels, each modality imperfect by design, the writer, the loader and its refusals."""
import json
from collections import Counter

import numpy as np
import pytest

from lmstack import cli
from lmstack.errors import LmstackError
from lmstack.multimodal.audio import SAMPLE_RATE, read_wav
from lmstack.multimodal.emotion_world import (CLASSES, CUES, NEGATED, P_AUDIO_CUE, P_TEXT_CUE, PROSODY, QUADRANT,
                                              SPLITS, build_emotion_world, ceilings, load_emotion_split,
                                              write_emotion_world)
from lmstack.multimodal.espeak import INSTALL, available

needs_espeak = pytest.mark.skipif(not available(), reason=f"espeak-ng cannot load; run: {INSTALL}")
APPRAISAL_WORDS = ("great", "good", "bad", "sadly", "happily", "terrible", "wonderful", "shame", "glad", "upset",
                   "love", "hate", "news")


def test_records_deterministic_and_truthful():
    a, b = build_emotion_world(300, seed=2), build_emotion_world(300, seed=2)
    assert a == b and a != build_emotion_world(300, seed=3)
    assert {r["label"] for r in a} == set(CLASSES) and {r["split"] for r in a} == {"train", "val", "test"}
    templates = {v: {t for t, _ in CUES[v] + NEGATED[v]} for v in ("positive", "negative")}
    for r in a:
        assert (r["arousal"], r["valence"]) == QUADRANT[r["label"]] and CLASSES[r["label_id"]] == r["label"]
        assert r["prosody"] in (r["arousal"], "neutral")
        if r["cue"] is None:  # no appraisal: the message is the spoken fact, valence unknowable from text
            assert r["text"] == r["spoken"] and r["cue_valence"] is None and not r["cue_negated"]
        else:
            assert r["cue"] in templates[r["valence"]] and r["cue_valence"] == r["valence"]
            assert r["text"] == r["cue"].format(s=r["spoken"]) and r["text"] != r["spoken"]
        # the voice reads only the fact: no appraisal word is ever spoken
        assert not set(r["spoken"].lower().replace(".", "").split()) & set(APPRAISAL_WORDS)


def test_each_modality_imperfect_by_design():
    recs = build_emotion_world(3000, seed=0)
    n = len(recs)
    assert abs(sum(r["cue"] is not None for r in recs) / n - P_TEXT_CUE) < 0.03
    assert abs(sum(r["prosody"] != "neutral" for r in recs) / n - (P_AUDIO_CUE)) < 0.03
    assert 0.2 < sum(r["cue_negated"] for r in recs) / sum(r["cue"] is not None for r in recs) < 0.45
    assert max(Counter(r["label"] for r in recs).values()) / n < 0.28  # balanced classes
    # the jittered bundles overlap in each field (high's lowest value under low's highest)
    for field in ("rate", "pitch", "pitch_range"):
        high = [r[field] for r in recs if r["prosody"] == "high"]
        low = [r[field] for r in recs if r["prosody"] == "low"]
        assert min(high) < max(low) and np.mean(high) > np.mean(low)
    assert PROSODY["high"][0] > PROSODY["neutral"][0] > PROSODY["low"][0]
    # negated cues put a word of the other valence into the message: "great" occurs in negative ones
    neg = [r["text"].lower() for r in recs if r["valence"] == "negative" and r["cue_negated"]]
    assert any("great" in t or "wonderful" in t or "glad" in t for t in neg)


def test_ceilings():
    c = ceilings()
    assert c["text"] == pytest.approx(0.5 * P_TEXT_CUE + 0.25 * (1 - P_TEXT_CUE))
    assert c["audio"] == pytest.approx(0.5 * P_AUDIO_CUE + 0.25 * (1 - P_AUDIO_CUE))
    assert max(c["text"], c["audio"]) < c["both"] < 1.0 and ceilings(1.0, 1.0)["both"] == 1.0


def test_bad_n():
    for bad in (0, -1, 1.5, "10", True):
        with pytest.raises(LmstackError, match="n must be"):
            build_emotion_world(bad)


@needs_espeak
def test_write_and_load(tmp_path):
    manifest = write_emotion_world(tmp_path / "w", 24, seed=1)
    assert manifest["counts"]["test"] == manifest["counts"]["test_noisy"] > 0
    assert sum(manifest["counts"][s] for s in ("train", "val", "test")) == 24
    assert "not emotion in real speech" in manifest["note"]
    test, noisy = load_emotion_split(tmp_path / "w", "test"), load_emotion_split(tmp_path / "w", "test_noisy")
    for (r, x), (rn, xn) in zip(test, noisy):
        assert r["text"] == rn["text"] and r["label"] == rn["label"] and rn["snr_db"] == 10.0
        assert x.shape == xn.shape and x.dtype == np.float32 and not np.allclose(x, xn)
    rec, samples = test[0]
    again, rate = read_wav((tmp_path / "w" / rec["audio"]).read_bytes())
    assert rate == SAMPLE_RATE and np.array_equal(again, samples)
    write_emotion_world(tmp_path / "v", 24, seed=1)  # the same seed: byte-identical files
    for name in [f"{s}.jsonl" for s in SPLITS] + [rec["audio"]]:
        assert (tmp_path / "v" / name).read_bytes() == (tmp_path / "w" / name).read_bytes()


def test_loader_refusals(tmp_path):
    with pytest.raises(LmstackError, match="manifest.json is missing"):
        load_emotion_split(tmp_path, "train")
    with pytest.raises(LmstackError, match="not an emotion-world split"):
        load_emotion_split(tmp_path, "dev")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text(json.dumps({"audio": "../../etc/passwd"}) + "\n")
    with pytest.raises(LmstackError, match="leaves the world directory"):
        load_emotion_split(tmp_path, "train")
    (tmp_path / "train.jsonl").write_text("not json\n")
    with pytest.raises(LmstackError, match="train.jsonl:1 is not an emotion record"):
        load_emotion_split(tmp_path, "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmstackError, match="is a file"):
        write_emotion_world(tmp_path / "file", 2)


@needs_espeak
def test_cli_synth_emotion(tmp_path, capsys):
    cli.run(["data", "synth-emotion", "--out", str(tmp_path / "cli"), "--n", "10", "--seed", "2"])
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["n"] == 10 and manifest["seed"] == 2
    assert sum(manifest["counts"][s] for s in ("train", "val", "test")) == 10
    assert "not emotion in real speech" in capsys.readouterr().out
