"""Perplexity / bits-per-byte on a text file: checked against a hand computation on a FakeLM."""
import math

import pytest

from lmstack.errors import LmstackError
from lmstack.eval.evaluator import evaluate
from lmstack.eval.tasks.perplexity import PerplexityTask, split_text

TEXT = "Héllo wörld, the cat sat.\nA second line of text here.\nÜber straße café.\n"


def test_bits_per_byte_matches_a_hand_computation(tmp_path, fake_lm_factory):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    # Each document costs 0.7 nats per character (so bytes, not characters, must be the denominator).
    lm = fake_lm_factory(rolling=lambda text: -0.7 * len(text))
    task = PerplexityTask(path=str(path), chunk_chars=30)
    out = evaluate(lm, [task], bootstrap_iters=0, progress=False)["results"]["perplexity"]
    docs = task.docs("test")
    assert len(docs) > 1 and "".join(d["text"] for d in docs) == TEXT  # chunks cover the file exactly
    total_ll = -0.7 * len(TEXT)
    n_bytes, n_words = len(TEXT.encode("utf-8")), len(TEXT.split())
    assert n_bytes > len(TEXT)  # the text has multi-byte characters
    m = out["metrics"]
    assert m["bits_per_byte"] == pytest.approx(-total_ll / (math.log(2) * n_bytes))
    assert m["byte_perplexity"] == pytest.approx(math.exp(-total_ll / n_bytes))
    assert m["word_perplexity"] == pytest.approx(math.exp(-total_ll / n_words))
    assert out["higher_is_better"]["bits_per_byte"] is False and out["chance"] is None
    assert [c for c in lm.calls if c[0] == "rolling"] == [("rolling", d["text"]) for d in docs]


def test_bits_per_byte_stderr_resamples_documents(tmp_path, fake_lm_factory):
    path = tmp_path / "t.txt"
    path.write_text("aaaa bbbb\nbbbb aaaa\n" * 20, encoding="utf-8")
    # Documents that start with "a" cost twice as much per byte, so resampling documents moves bpb.
    lm = fake_lm_factory(rolling=lambda text: -float(len(text)) * (2.0 if text.startswith("a") else 1.0))
    m = evaluate(lm, [PerplexityTask(path=str(path), chunk_chars=12)], bootstrap_iters=50,
                 progress=False)["results"]["perplexity"]["metrics"]
    assert m["bits_per_byte_stderr"] > 0.0


def test_bad_files_give_clear_errors_or_skip(tmp_path, fake_lm_factory):
    lm = fake_lm_factory()
    missing = evaluate(lm, [PerplexityTask(path=str(tmp_path / "nope.txt"))], progress=False)
    assert "missing" in missing["results"]["perplexity"]["skipped"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe bytes")
    with pytest.raises(LmstackError, match="not UTF-8"):
        PerplexityTask(path=str(bad)).docs("test")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(LmstackError, match="empty"):
        PerplexityTask(path=str(empty)).docs("test")
    with pytest.raises(LmstackError, match="path"):
        PerplexityTask().docs("test")
    assert split_text("ab\ncd\nef", 4) == ["ab\n", "cd\n", "ef"]


def test_perplexity_of_a_real_model_is_finite_and_bounded(tmp_path, tiny_lm):
    path = tmp_path / "t.txt"
    path.write_text("the cat sat on a mat. " * 30, encoding="utf-8")
    m = evaluate(tiny_lm, [PerplexityTask(path=str(path), chunk_chars=200)], bootstrap_iters=0,
                 progress=False)["results"]["perplexity"]["metrics"]
    # A random 400-token model: between 0 and log2(400) * (tokens/bytes) bits per byte, and finite.
    assert 0 < m["bits_per_byte"] < math.log2(400) and math.isfinite(m["word_perplexity"])


def test_tinyshakespeare_task_reads_the_shared_file(shared_data, fake_lm_factory):
    lm = fake_lm_factory(rolling=lambda text: -2.0 * len(text.encode("utf-8")))
    res = evaluate(lm, ["tinyshakespeare_ppl"], limit=2, bootstrap_iters=0, progress=False)
    m = res["results"]["tinyshakespeare_ppl"]["metrics"]
    assert res["results"]["tinyshakespeare_ppl"]["n"] == 2
    assert m["bits_per_byte"] == pytest.approx(2.0 / math.log(2))  # 2 nats per byte, whatever the text
