"""The CTC baseline: greedy collapse, prefix beam search beating the best path, an overfit model transcribing,
and its size against the Whisper-style model."""
import math

import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.multimodal.asr_train import ASRTrainConfig, fit, pad_batch
from lmstack.multimodal.audio import log_mel
from lmstack.multimodal.ctc import BLANK, CTCConfig, CTCModel, CTCRecognizer, greedy_ctc, prefix_beam_ctc
from lmstack.multimodal.whisper import Whisper, WhisperConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread joins cost more than ops


def _logp(rows):
    return np.log(np.array(rows, dtype=np.float64))


def test_greedy_collapses_repeats_and_drops_blanks():
    # frames: a a blank a b b -> "aab" (a blank separates the two a's)
    eye = np.full((6, 3), 1e-3)
    for t, k in enumerate([1, 1, BLANK, 1, 2, 2]):
        eye[t, k] = 1.0
    assert greedy_ctc(np.log(eye)) == [1, 1, 2]


def test_prefix_beam_sums_alignments_where_the_best_path_does_not():
    # two frames, p(blank)=0.6, p(a)=0.4: best path is "" (0.36) but "a" has 0.16 + 0.24 + 0.24 = 0.64
    logp = _logp([[0.6, 0.4], [0.6, 0.4]])
    assert greedy_ctc(logp) == []
    assert prefix_beam_ctc(logp, beam=4, prune=2) == [1]
    # a repeat needs a blank between: a, a -> "a"; a, blank, a -> "aa"
    assert prefix_beam_ctc(_logp([[0.01, 0.99], [0.01, 0.99]]), beam=2, prune=2) == [1]
    assert prefix_beam_ctc(_logp([[0.01, 0.99], [0.99, 0.01], [0.01, 0.99]]), beam=2, prune=2) == [1, 1]
    with pytest.raises(LmstackError, match="beam"):
        prefix_beam_ctc(logp, beam=0)


def test_ctc_loss_matches_the_probability_of_all_alignments():
    # one frame pair, target "a": -log(0.64) from the hand count above, through our model's loss path
    logp = torch.log(torch.tensor([[[0.6, 0.4]], [[0.6, 0.4]]]))
    loss = torch.nn.functional.ctc_loss(logp, torch.tensor([1]), torch.tensor([2]), torch.tensor([1]), blank=BLANK,
                                        reduction="sum")
    assert float(loss) == pytest.approx(-math.log(0.64), rel=1e-5)


def _speak(text: str) -> np.ndarray:
    """A toy 'voice': each character a 80 ms tone of its own pitch (300 Hz apart, so mel bands tell them apart),
    then 40 ms of silence."""
    t = np.arange(1280) / 16000
    parts = []
    for ch in text:
        parts += [0.3 * np.sin(2 * np.pi * (300 + 300 * ALPHABET.index(ch)) * t), np.zeros(640)]
    return np.concatenate(parts).astype(np.float32)


ALPHABET = sorted(set("Ada4217bob"))


def test_overfit_ctc_transcribes_its_clips():
    texts = ["Ada", "4217", "bob"]
    clips = [_speak(x) for x in texts]
    torch.manual_seed(0)
    model = CTCModel(CTCConfig(d_model=32, n_heads=2, n_encoder_layers=1, n_audio_ctx=50))
    cfg = ASRTrainConfig(steps=200, batch_size=3, lr=3e-3, warmup=5, spec_augment=False, progress=False,
                         log_every=25)
    rows = fit(model, model.loss, [log_mel(c) for c in clips], texts, cfg)
    assert rows[-1]["loss"] < 0.2 < rows[0]["loss"]
    asr = CTCRecognizer(model)
    assert asr.transcribe_batch(clips) == texts
    assert asr.transcribe_batch(clips, beam=4) == texts
    mel, frames = pad_batch([log_mel(c) for c in clips[:2]])
    with pytest.raises(LmstackError, match="empty"):
        model.loss(mel, frames, ["ok", "\u00e9"])


def test_benchmark_sizes_are_within_ten_percent():
    whisper = Whisper(WhisperConfig(d_model=64, n_heads=4, n_encoder_layers=4, n_decoder_layers=2, n_audio_ctx=400,
                                    n_text_ctx=96)).num_parameters()
    ctc = CTCModel(CTCConfig(d_model=64, n_heads=4, n_encoder_layers=7, n_audio_ctx=400)).num_parameters()
    assert abs(ctc / whisper - 1) < 0.10
