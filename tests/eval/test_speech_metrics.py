"""WER/CER: the error breakdown of known edits, normalisation, and refusals."""
import pytest

from lmstack.errors import LmstackError
from lmstack.eval.speech_metrics import align_counts, bootstrap_stderr, cer, normalize, wer


def test_wer_counts_each_kind_of_edit():
    out = wer(["a b c d", "the cat sat"], ["a x c d e", "the sat"])
    assert (out["sub"], out["del"], out["ins"]) == (1, 1, 1)
    assert out["words"] == 7 and out["errors"] == 3 and out["utterances"] == 2
    assert out["wer"] == pytest.approx(3 / 7)


def test_normalisation_ignores_case_and_punctuation():
    assert normalize("Ada's  Born, in AMBERHAVEN.") == "adas born in amberhaven"
    assert wer(["Ada was born in Amberhaven."], ["ada was born in amberhaven"])["wer"] == 0.0


def test_wer_can_exceed_one_and_cer_counts_characters():
    assert wer(["a"], ["b c d"])["wer"] == 3.0
    out = cer(["abc"], ["abd"])
    assert out["chars"] == 3 and out["sub"] == 1 and out["cer"] == pytest.approx(1 / 3)


def test_alignment_is_minimal():
    assert sum(align_counts(list("kitten"), list("sitting"))) == 3
    assert align_counts([], ["x", "y"]) == (0, 0, 2)


def test_bootstrap_stderr_is_zero_for_perfect_and_positive_for_mixed():
    refs = ["a b", "c d", "e f", "g h"]
    assert bootstrap_stderr(refs, refs, n_boot=50) == 0.0
    assert bootstrap_stderr(refs, ["a b", "x y", "e f", "g"], n_boot=200) > 0.0


def test_bad_input_is_refused():
    with pytest.raises(LmstackError, match="hypothes"):
        wer(["a"], [])
    with pytest.raises(LmstackError, match="empty"):
        wer([], [])
    with pytest.raises(LmstackError, match="no words"):
        wer(["..."], ["a"])
