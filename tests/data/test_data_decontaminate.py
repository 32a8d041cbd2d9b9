import json
from pathlib import Path

import pytest

from lmstack.data.decontaminate import DecontamConfig, Decontaminator, contamination_report, read_eval_items
from lmstack.data.document import make_doc
from lmstack.errors import LmstackError

SHARED = Path(__file__).resolve().parents[2] / "../shared/data"
FILLER = "This is ordinary training text about farming rivers and markets that nobody would call a benchmark. "
Q1 = ("Natalia sold clips to forty eight of her friends in April and then she sold half as many clips in May "
      "how many clips did Natalia sell altogether")
Q2 = "Which gas do plants absorb from the air during photosynthesis in order to build sugars and release oxygen"


@pytest.fixture
def evalsets(tmp_path):
    d = tmp_path / "evals" / "mini"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text(json.dumps({"question": Q1, "answer": "72"}) + "\n"
                                  + json.dumps({"question": "Too short to check.", "answer": "x"}) + "\n")
    (d / "arc.csv").write_text(f'query,choices\n"{Q2}",carbon dioxide\n', encoding="utf-8")
    return tmp_path / "evals"


def test_planted_contamination_is_found_and_attributed(evalsets):
    dec = Decontaminator(DecontamConfig(paths=[str(evalsets)], strings=["the secret passphrase of the inline benchmark is "
                                                                        "written right here in thirteen plus words"]))
    assert dec.summary()["items"] == {"inline": 1, "mini/arc": 1, "mini/test": 2}
    assert dec.summary()["too_short"] == {"mini/test": 1}
    w = Q1.split()
    docs = [
        make_doc(FILLER + " ".join(w[3:16]) + " " + FILLER, "q1-13gram", "s"),          # exactly 13 words of Q1
        make_doc(FILLER + " ".join(w[3:15]) + " " + FILLER, "q1-12gram", "s"),          # 12 words: below n
        make_doc(FILLER.upper() + Q2.upper() + "?!", "q2-case", "s"),                   # case and punctuation differ
        make_doc("Note: the SECRET passphrase of the inline benchmark is written, right here, in thirteen plus words.",
                 "inline", "s"),
        make_doc(FILLER * 3, "clean", "s"),
    ]
    items = {d["id"]: dec.hits(d["text"])[0] for d in docs}
    assert items == {"q1-13gram": ["mini/test:1"], "q1-12gram": [], "q2-case": ["mini/arc:2"],
                     "inline": ["inline:0"], "clean": []}
    res = dec(docs)
    assert [d["id"] for d in res.kept] == ["q1-12gram", "clean"]
    assert res.reasons() == {"contaminated:mini/test": 1, "contaminated:mini/arc": 1, "contaminated:inline": 1}
    report = contamination_report([d["meta"]["contamination"] for d in dec.annotate(docs) if "contamination" in d["meta"]])
    assert report["mini/test"] == {"documents": 1, "items_hit": 1, "examples": ["mini/test:1"]}


def test_flag_mode_min_hits_and_ngram(evalsets):
    doc = make_doc(FILLER + Q1 + " " + FILLER, "d", "s")
    flagged = Decontaminator(DecontamConfig(paths=[str(evalsets)], action="flag"))([doc])
    assert flagged.kept[0]["meta"]["contamination"] == ["mini/test:1"] and flagged.modified["flagged"] == 1
    assert "contamination" not in doc["meta"]
    n_grams = len(Q1.split()) - 13 + 1
    strict = Decontaminator(DecontamConfig(paths=[str(evalsets)], min_hits=n_grams + 1))([doc])
    assert len(strict.kept) == 1
    w = Q1.split()
    eight = Decontaminator(DecontamConfig(paths=[str(evalsets)], ngram=8))
    assert eight.hits(FILLER + " ".join(w[:8]))[0] == ["mini/test:1"]


def test_errors(tmp_path):
    with pytest.raises(LmstackError, match="does not exist"):
        Decontaminator(DecontamConfig(paths=[str(tmp_path / "missing.jsonl")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "ok"}\nnot json\n')
    with pytest.raises(LmstackError, match="bad.jsonl:2"):
        list(read_eval_items(bad))
    assert Decontaminator(DecontamConfig()).hits("anything at all") == ([], 0)


def test_real_eval_sets_when_present():
    gsm = SHARED / "gsm8k" / "test.jsonl"
    hella = SHARED / "hellaswag" / "hellaswag_val_first1000.jsonl"
    if not gsm.is_file() or not hella.is_file():
        pytest.skip("../shared/data eval sets not present")
    dec = Decontaminator(DecontamConfig(paths=[str(gsm), str(hella)]))
    line5 = json.loads(gsm.read_text(encoding="utf-8").splitlines()[4])
    leaked = make_doc("Homework help! " + line5["question"] + " Thanks in advance.", "leak", "web")
    items, n = dec.hits(leaked["text"])
    assert "gsm8k/test:5" in items and n >= 1
    assert dec.hits(FILLER * 5) == ([], 0)
    assert dec.summary()["items"]["hellaswag/hellaswag_val_first1000"] == 1000


def test_short_items_are_matched_whole(tmp_path):
    qa = "Question: Silas Nettridge goes to work in which city? Answer: Fernwick"  # 11 words < 13
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"text": qa, "kind": "qa"}) + "\n" + json.dumps({"text": "Where? Here."}) + "\n")
    dec = Decontaminator(DecontamConfig(paths=[str(f)]))
    assert dec.summary()["short_lengths"] == [11] and dec.summary()["too_short"] == {f"{tmp_path.name}/qa": 1}
    assert dec.hits("Notes from the trivia night.\n" + qa + "\nEveryone got that one right.")[0] == [f"{tmp_path.name}/qa:1"]
    assert dec.hits("Question: Silas Nettridge goes to work in which city? Answer: Driftburgh") == ([], 0)
    strict = Decontaminator(DecontamConfig(paths=[str(f)], min_ngram=0))
    assert strict.hits(qa) == ([], 0) and strict.summary()["too_short"] == {f"{tmp_path.name}/qa": 2}
    with pytest.raises(ValueError, match="min_ngram"):
        DecontamConfig(min_ngram=20)
