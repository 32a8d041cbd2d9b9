"""Caption metrics against hand-computed cases and their known properties (eval/caption_metrics.py)."""
import math

import pytest

from lmstack.errors import LmstackError
from lmstack.eval.caption_metrics import attribute_match, cider_d, corpus_bleu, corpus_bleu_stderr, mentioned_pairs, \
    sentence_bleu, tokenize
from lmstack.multimodal.vision_world import build_vision_world


def test_tokenize_drops_punctuation_and_case():
    assert tokenize("A Red circle, and 2 stars.") == ["a", "red", "circle", "and", "2", "stars"]


def test_bleu_identical_is_one():
    refs = [["a small red circle on a white background"], ["there are 2 shapes: a blue star and a red cross"]]
    assert corpus_bleu([r[0] for r in refs], refs) == pytest.approx(1.0)


def test_bleu_hand_computed_add1():
    # p1 = 5/6, p2 = (3+1)/(5+1), p3 = (1+1)/(4+1), p4 = (0+1)/(3+1); equal lengths, so no brevity penalty
    got = corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]], smoothing="add1")
    assert got == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    assert sentence_bleu("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(got)
    # without smoothing, no matching 4-gram means 0, as in the paper
    assert corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0


def test_bleu_brevity_penalty_and_clipping():
    # c = 2 words against r = 6: exp(1 - 6/2), with perfect uni- and bigram precision
    assert corpus_bleu(["the cat"], [["the cat sat on the mat"]], max_n=2) == pytest.approx(math.exp(-2))
    # "the" is clipped to the reference's one occurrence: 1/4
    assert corpus_bleu(["the the the the"], [["the cat"]], max_n=1) == pytest.approx(0.25)
    # the closest reference length is used: the 4-word reference, so no penalty
    assert corpus_bleu(["a b c d"], [["a b c d e f g h", "a b c d"]]) == pytest.approx(1.0)


def test_bleu_is_a_corpus_statistic():
    # corpus: unigram matches 2+1 over 2+2 words; not the mean of the two sentences' precisions
    cands, refs = ["a b", "c d"], [["a b"], ["c e"]]
    assert corpus_bleu(cands, refs, max_n=1) == pytest.approx(3 / 4)


def test_cider_hand_computed_unigrams():
    refs = [["red circle"], ["blue square"]]
    out = cider_d(["red circle", "red square"], refs, max_n=1)
    # every word is in one of the two images: idf = ln 2 for all; cosine 1 then 1/2, times 10
    assert out["per_item"] == pytest.approx([10.0, 5.0])
    assert out["score"] == pytest.approx(7.5)


def test_cider_clips_repeats_and_penalises_length():
    out = cider_d(["red red circle", "blue square"], [["red circle"], ["blue square"]], max_n=1)
    # dot = min(2, 1) * 1 + 1 * 1 (in ln2^2 units), norms sqrt(5) and sqrt(2); one word too long: exp(-1/72)
    assert out["per_item"][0] == pytest.approx(10 * 2 / math.sqrt(10) * math.exp(-1 / 72))


def test_cider_ignores_words_every_image_has():
    refs = [["a red circle"], ["a blue square"], ["a green star"]]
    with_a = cider_d(["a red circle", "a", "a"], refs)["per_item"][1]
    assert with_a == 0.0  # "a" is in every image's references: idf 0


def test_cider_properties():
    records = build_vision_world(n_images=12, size=64, seed=3)
    refs = [r["captions"] for r in records]
    exact = cider_d([r[0] for r in refs], refs)["score"]
    shifted = cider_d([refs[(i + 1) % len(refs)][0] for i in range(len(refs))], refs)["score"]
    assert exact > 3.0
    assert shifted < exact / 2


def test_metrics_refuse_bad_input():
    with pytest.raises(LmstackError, match="reference lists"):
        corpus_bleu(["a"], [])
    with pytest.raises(LmstackError, match="non-empty list"):
        cider_d(["a"], ["a red circle"])
    with pytest.raises(LmstackError, match="smoothing"):
        corpus_bleu(["a"], [["a"]], smoothing="lots")


def test_attribute_match_reads_the_scene():
    scene = {"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "cross"},
                         {"colour": "blue", "shape": "cross"}]}
    assert attribute_match("A small red circle and two blue crosses.", scene) == (1.0, 1.0)
    assert attribute_match("A red circle.", scene) == (0.0, 0.5)
    assert attribute_match("A red circle, a blue cross and a green star.", scene) == (0.0, 1.0)  # one too many
    assert mentioned_pairs("a large pink star, an orange diamond") == {("pink", "star"), ("orange", "diamond")}
    with pytest.raises(LmstackError, match="scene"):
        attribute_match("a red circle", {"things": []})


def test_world_captions_match_their_own_scene():
    for rec in build_vision_world(n_images=10, size=64, seed=1):
        for caption in rec["captions"]:
            assert attribute_match(caption, rec["scene"]) == (1.0, 1.0)


def test_bleu_bootstrap_stderr():
    records = build_vision_world(n_images=20, size=64, seed=2)
    refs = [r["captions"][1:] for r in records]
    same = [r["captions"][0] for r in records]
    score, err = corpus_bleu_stderr(same, refs, n_boot=50)
    assert score == pytest.approx(corpus_bleu(same, refs))
    assert 0 < err < 0.2
    assert corpus_bleu_stderr([r[0] for r in refs], refs, n_boot=20) == (pytest.approx(1.0), pytest.approx(0.0))
