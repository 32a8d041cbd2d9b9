"""Standard tasks scored through evaluate() with a FakeLM whose log-likelihoods are scripted, so acc,
acc_norm, ECE, MC2 mass and LAMBADA perplexity have known values."""
import csv
import json
import math

import pytest

from lmstack.eval.evaluator import evaluate
from lmstack.eval.task import get_task
from lmstack.eval.tasks.multiple_choice import ece_of_items

# Three items: acc picks the higher raw log-likelihood, acc_norm the higher per-character one.
#   item 0: gold 0, raw argmax 0 (acc 1), per-char argmax 1 (acc_norm 0)
#   item 1: gold 1, raw argmax 0 (acc 0), per-char argmax 1 (acc_norm 1)
#   item 2: gold 0, raw argmax 1 (acc 0), per-char argmax 0 (acc_norm 1)
ITEMS = [(["a", "bbbbbbbb"], 0, [-2.0, -3.0]),
         (["c", "dddddddddd"], 1, [-1.0, -5.0]),
         (["eeee", "f"], 0, [-2.0, -1.0])]
LL = {" " + c: ll for choices, _, lls in ITEMS for c, ll in zip(choices, lls)}


def by_continuation(ctx, cont):
    return LL[cont]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_DATA", str(tmp_path))
    return tmp_path


def run(lm, task, **kw):
    out = evaluate(lm, [task], bootstrap_iters=200, progress=False, **kw)
    name = task if isinstance(task, str) else task.name
    return out["results"][name]


def expected_ece(items):
    return ece_of_items([(lls, gold) for _, gold, lls in items])


@pytest.mark.parametrize("name,path,row", [
    ("arc_easy", "arc/arc_easy_test.jsonl", lambda i, ch, g: {"query": f"Question: q{i}", "choices": ch, "gold": g}),
    ("hellaswag", "hellaswag/hellaswag_val_first1000.jsonl", lambda i, ch, g: {"ctx": f"c{i}", "endings": ch,
                                                                                "label": g}),
])
def test_acc_and_acc_norm_differ_as_scripted(name, path, row, data_root, fake_lm_factory):
    write_jsonl(data_root / path, [row(i, ch, g) for i, (ch, g, _) in enumerate(ITEMS)])
    res = run(fake_lm_factory(loglikelihood=by_continuation), name)
    m = res["metrics"]
    assert m["acc"] == pytest.approx(1 / 3) and m["acc_norm"] == pytest.approx(2 / 3)
    assert m["ece"] == pytest.approx(expected_ece(ITEMS))
    assert {"acc_stderr", "acc_norm_stderr", "ece_stderr"} <= set(m) and m["acc_stderr"] > 0
    assert res["chance"] == 0.5 and res["n"] == 3
    assert res["higher_is_better"]["acc"] is True and res["higher_is_better"]["ece"] is False


def test_generic_multiple_choice_scores_and_ece_by_hand(tmp_path, fake_lm_factory):
    # Both items: softmax confidence 0.75 on choice 0; one right, one wrong -> ECE = |0.5 - 0.75|.
    path = tmp_path / "mc.jsonl"
    write_jsonl(path, [{"query": "Q1", "choices": ["x", "y"], "gold": 0},
                       {"query": "Q2", "choices": ["x", "y"], "gold": 1}])
    lm = fake_lm_factory(loglikelihood=lambda ctx, cont: 0.0 if cont == " x" else -math.log(3))
    m = run(lm, get_task("multiple_choice", path=str(path)))["metrics"]
    assert m["acc"] == 0.5 and m["ece"] == pytest.approx(0.25)


@pytest.mark.parametrize("name,path,rows,lls,acc", [
    # BoolQ: item 0 "yes" wins (gold yes), item 1 "yes" wins (gold no).
    ("boolq", "superglue/boolq_dev.jsonl",
     [{"query": "Passage: P0\nQuestion: q0?", "choices": ["no", "yes"], "gold": 1},
      {"query": "Passage: P1\nQuestion: q1?", "choices": ["no", "yes"], "gold": 0}],
     {" no": -2.0, " yes": -1.0}, 0.5),
    # COPA: the longer, lower-cased choice wins both times (gold 1 then 0).
    ("copa", "superglue/copa_dev.jsonl",
     [{"query": "A fell, because", "choices": ["It slipped.", "It slipped on ice."], "gold": 1},
      {"query": "B fell, therefore", "choices": ["it broke.", "it did."], "gold": 0}],
     {"  it slipped.": -3.0, "  it slipped on ice.": -1.0, "  it broke.": -1.0, "  it did.": -4.0}, 1.0),
])
def test_acc_only_tasks(name, path, rows, lls, acc, data_root, fake_lm_factory):
    write_jsonl(data_root / path, rows)
    res = run(fake_lm_factory(loglikelihood=lambda ctx, cont: lls[cont]), name)
    assert res["metrics"]["acc"] == acc and "acc_norm" not in res["metrics"]
    assert "ece" in res["metrics"] and res["chance"] == 0.5


def test_winogrande_compares_the_ending_under_each_option(data_root, fake_lm_factory):
    write_jsonl(data_root / "winogrande/winogrande_dev.jsonl", [
        {"sentence": "Ann beat Bo because _ trained.", "option1": "Ann", "option2": "Bo", "answer": "1"},
        {"sentence": "Cy beat Di because _ was slow.", "option1": "Cy", "option2": "Di", "answer": "2"},
        {"sentence": "Ed beat Flo because _ was fast.", "option1": "Ed", "option2": "Flo", "answer": "1"}])
    # Scores depend on the context only (the option); the continuation is the same for both requests.
    by_option = {"Ann beat Bo because Ann": -1.0, "Ann beat Bo because Bo": -2.0,
                 "Cy beat Di because Cy": -1.0, "Cy beat Di because Di": -3.0,
                 "Ed beat Flo because Ed": -2.0, "Ed beat Flo because Flo": -1.0}
    lm = fake_lm_factory(loglikelihood=lambda ctx, cont: by_option[ctx])
    res = run(lm, "winogrande")
    assert res["metrics"]["acc"] == pytest.approx(1 / 3) and res["chance"] == 0.5
    assert {c for kind, _, c in lm.calls} == {" trained.", " was slow.", " was fast."}


def test_mmlu_letter_scoring(data_root, fake_lm_factory):
    folder = data_root / "mmlu/test"
    folder.mkdir(parents=True)
    with open(folder / "virology_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["q0", "a", "b", "c", "d", "C"], ["q1", "a", "b", "c", "d", "A"]])
    lm = fake_lm_factory(loglikelihood=lambda ctx, cont: -1.0 if cont == " C" else -2.0)
    res = run(lm, "mmlu_virology")
    assert res["metrics"]["acc"] == 0.5 and res["chance"] == 0.25 and "acc_norm" not in res["metrics"]
    assert lm.calls[0][1].startswith("The following are multiple choice questions (with answers) about virology.")


def test_truthfulqa_mc2_is_the_probability_mass_on_true_answers(data_root, fake_lm_factory):
    (data_root / "truthfulqa").mkdir()
    (data_root / "truthfulqa/TruthfulQA.csv").write_text(
        "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
        "A,M,Q one?,T1,T1; T2,F1; F2,s\n", encoding="utf-8")
    probs = {" T1.": 0.1, " T2.": 0.3, " F1.": 0.4, " F2.": 0.2}
    lm = fake_lm_factory(loglikelihood=lambda ctx, cont: math.log(probs[cont]))
    mc2 = run(lm, "truthfulqa_mc2")
    assert mc2["metrics"]["acc"] == pytest.approx(0.4) and mc2["chance"] == 0.5
    # The prediction (F1, p=0.4 of the mass) is false: ECE = |0 - 0.4|.
    assert mc2["metrics"]["ece"] == pytest.approx(0.4)
    mc1 = run(lm, "truthfulqa_mc1")        # T1 (0.1) against F1, F2: wrong
    assert mc1["metrics"]["acc"] == 0.0 and mc1["chance"] == pytest.approx(1 / 3)


def test_truthfulqa_mc2_counts_any_true_prediction_as_right_for_ece(data_root, fake_lm_factory):
    (data_root / "truthfulqa").mkdir()
    (data_root / "truthfulqa/TruthfulQA.csv").write_text(
        "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
        "A,M,Q one?,T1,T1; T2,F1,s\n", encoding="utf-8")
    probs = {" T1.": 0.2, " T2.": 0.5, " F1.": 0.3}
    res = run(fake_lm_factory(loglikelihood=lambda ctx, cont: math.log(probs[cont])), "truthfulqa_mc2")
    assert res["metrics"]["acc"] == pytest.approx(0.7)
    assert res["metrics"]["ece"] == pytest.approx(0.5)   # predicted T2 (true) with confidence 0.5


def test_lambada_acc_is_greedy_match_and_perplexity_is_exp_mean(tmp_path, fake_lm_factory):
    path = tmp_path / "l.jsonl"
    write_jsonl(path, [{"context": "a b", "continuation": " c"}, {"context": "d e", "continuation": " f"}])
    answers = {" c": (-1.0, True), " f": (-3.0, False)}
    res = run(fake_lm_factory(loglikelihood=lambda ctx, cont: answers[cont]), get_task("lambada", path=str(path)))
    m = res["metrics"]
    assert m["acc"] == 0.5 and m["perplexity"] == pytest.approx(math.exp(2.0))
    assert res["higher_is_better"]["perplexity"] is False and res["chance"] is None and "perplexity_stderr" in m
