"""Word timestamps (asr_timing.py + the opt-in cross-attention path of whisper.py): DTW on hand-made matrices,
word grouping of character tokens, the saved alignment heads, and transcribe_words on a tiny random model."""
import json

import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.asr import SpeechRecognizer
from lmstack.multimodal.asr_timing import (FRAME_SECONDS, alignment_matrix, choose_heads, default_heads, dtw,
                                           proportional_words, speech_span, word_token_spans, word_times)
from lmstack.multimodal.whisper import Whisper, WhisperConfig

TINY = WhisperConfig(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=2, n_text_ctx=40)


def test_dtw_follows_the_cheap_cells_of_a_hand_made_matrix():
    # rows 0..2 are cheap on columns {0}, {1, 2}, {3, 4}: the path stays in each row while it is cheap
    cost = np.ones((3, 5))
    cost[0, 0] = cost[1, 1] = cost[1, 2] = cost[2, 3] = cost[2, 4] = 0.0
    rows, cols = dtw(cost)
    assert rows.tolist() == [0, 1, 1, 2, 2] and cols.tolist() == [0, 1, 2, 3, 4]
    # more rows than columns: the path must go down within a column and still end at the corner
    rows, cols = dtw(np.zeros((4, 2)))
    assert (rows[0], cols[0], rows[-1], cols[-1]) == (0, 0, 3, 1)
    assert np.all(np.diff(rows) >= 0) and np.all(np.diff(cols) >= 0)
    with pytest.raises(LmstackError, match="non-empty 2-D"):
        dtw(np.zeros((0, 3)))


def test_character_tokens_group_into_words_split_on_spaces():
    assert word_token_spans("Ada was  born.") == [("Ada", 0, 3), ("was", 4, 7), ("born.", 9, 14)]
    assert word_token_spans("  ") == []


def test_word_times_of_a_block_matrix_and_the_space_rules():
    text = "ab cd"  # rows: a b ' ' c d <eot>; each row owns 2 frames
    matrix = np.full((6, 12), -1.0)
    for r in range(6):
        matrix[r, 2 * r: 2 * r + 2] = 1.0
    f = FRAME_SECONDS
    assert word_times(text, matrix, spaces="none") == [("ab", 0.0, 4 * f), ("cd", 6 * f, 10 * f)]
    split = word_times(text, matrix)
    assert split == [("ab", 0.0, pytest.approx(5 * f)), ("cd", pytest.approx(5 * f), pytest.approx(10 * f))]
    assert word_times(text, matrix, spaces="next")[1][1] == pytest.approx(4 * f)
    with pytest.raises(LmstackError, match="rows"):
        word_times("abc", matrix)


def test_alignment_matrix_normalises_filters_and_averages_heads():
    rng = np.random.default_rng(0)
    weights = [rng.random((2, 5, 30)), rng.random((2, 5, 30))]
    one = alignment_matrix(weights, [(1, 0)], 20, median_width=1)
    assert one.shape == (5, 20) and np.allclose(one.mean(axis=0), 0.0, atol=1e-9)  # z-scores over tokens
    both = alignment_matrix(weights, [(1, 0), (0, 1)], 20, median_width=1)
    assert np.allclose(both, (one + alignment_matrix(weights, [(0, 1)], 20, median_width=1)) / 2)
    assert not np.allclose(alignment_matrix(weights, [(1, 0)], 20, median_width=7), one)


def test_cross_weights_path_matches_the_sdpa_decoder():
    torch.manual_seed(0)
    model = Whisper(TINY).eval()
    mel, frames = torch.randn(2, 80, 60), torch.tensor([60, 40])
    with torch.no_grad():
        enc, mask = model.encode(mel, frames)
    tokens = torch.randint(0, 95, (2, 7))
    with torch.no_grad():
        logits, weights = model.decode_with_cross_weights(tokens, enc, mask)
    assert torch.allclose(logits, model.decode(tokens, enc, mask), atol=1e-5)
    assert len(weights) == 2 and weights[0].shape == (2, 2, 7, 30)
    assert torch.allclose(weights[1].sum(-1), torch.ones(2, 2, 7), atol=1e-5)
    assert float(weights[0][1, :, :, 20:].abs().max()) == 0.0  # the padded positions of row 1


def test_alignment_heads_default_save_and_refusal(tmp_path):
    asr = SpeechRecognizer.random(TINY, seed=0)
    assert asr.alignment_heads == default_heads(2, 2) == [(1, 0), (1, 1)]
    path = asr.save(tmp_path / "old")
    assert "alignment_heads" not in json.loads((path / "config.json").read_text())
    asr.alignment_heads, asr.median_width = [[0, 1]], 3
    loaded = SpeechRecognizer.from_dir(asr.save(tmp_path / "new"))
    assert loaded.alignment_heads == [(0, 1)] and loaded.median_width == 3
    with pytest.raises(LmstackError, match=r"\[2, 0\].*2 decoder blocks x 2 heads"):
        asr.alignment_heads = [[2, 0]]
    cfg = json.loads((path / "config.json").read_text())
    cfg["alignment_heads"] = [[0, 5]]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="config.json.*alignment head"):
        SpeechRecognizer.from_dir(path)


def test_transcribe_words_gives_the_transcript_words_in_time_order():
    asr = SpeechRecognizer.random(TINY, seed=1)
    t = np.arange(16000 * 2) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * (t > 0.5)).astype(np.float32)
    text, words = asr.transcribe_words(samples)
    assert [w for w, _, _ in words] == text.split()
    times = [x for _, a, b in words for x in (a, b)]
    assert all(a <= b for a, b in zip(times, times[1:])) and 0.0 <= times[0] and times[-1] <= 2.0 + 1e-6
    assert asr.word_timestamps(samples, "two words")[1][0] == "words"


def test_choose_heads_prefers_the_head_that_tracks_the_reference():
    text, frames = "ab cd", 12
    good = np.full((6, frames), 0.0)
    for r in range(6):
        good[r, 2 * r: 2 * r + 2] = 1.0
    bad = np.random.default_rng(0).random((6, frames))
    weights = [np.stack([bad, good])]  # one block, head 1 is the aligned one
    ref = word_times(text, good, spaces="split")
    heads, info = choose_heads([(text, weights, frames, ref)], 1, 2, median_width=1)
    assert heads[0] == (0, 1) and info["single"]["0.1"] < info["single"]["0.0"]


def test_proportional_baseline_spreads_words_over_the_speech_span():
    x = np.zeros(16000, dtype=np.float32)
    x[4000:12000] = 0.5  # speech from 0.25 s to 0.75 s
    assert speech_span(x) == pytest.approx((0.25, 0.75))
    words = proportional_words("ab cdef", x)  # 7 characters over 0.5 s
    assert words[0] == ("ab", pytest.approx(0.25), pytest.approx(0.25 + 2 / 7 * 0.5))
    assert words[1][1:] == (pytest.approx(0.25 + 3 / 7 * 0.5), pytest.approx(0.75))


def test_cli_transcribe_prints_one_timed_line_per_word(tmp_path, capsys):
    from lmstack import cli
    from lmstack.multimodal.audio import write_wav

    model = SpeechRecognizer.random(TINY, seed=1).save(tmp_path / "asr")
    t = np.arange(16000 * 2) / 16000
    wav = tmp_path / "clip.wav"
    wav.write_bytes(write_wav((0.3 * np.sin(2 * np.pi * 220 * t) * (t > 0.5)).astype(np.float32), 16000))
    assert cli.main(["mm", "transcribe", str(wav), "--model", str(model), "--timestamps"]) == 0
    lines = capsys.readouterr().out.splitlines()
    text, timed = lines[0], [line.split() for line in lines[1:]]
    assert [row[2] for row in timed] == text.split() and text.split()
    assert all(float(a) <= float(b) for a, b, _ in timed)
