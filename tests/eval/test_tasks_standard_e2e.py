"""Standard tasks on real files (skipped when ../shared/data is absent) and end to end on the tiny random
LocalLM through evaluate(): structure, chance columns, standard errors, per-item logs."""
import json
import random
import warnings

import pytest

from lmstack.eval.evaluator import evaluate
from lmstack.eval.task import TaskDataMissing, get_task

WORDS = ("the cat sat on a mat and dog ran to park while birds sang in old trees near green hills "
         "under blue sky where people walk each day").split()


def real_docs(name, **kw):
    task = get_task(name, **kw)
    try:
        return task, task.cached_docs(task.eval_split)
    except TaskDataMissing as e:
        pytest.skip(str(e))


def test_real_arc_files():
    task, docs = real_docs("arc_easy")
    assert len(docs) == 2376 and docs[0]["gold"] == 0
    assert task.doc_to_text(docs[0]) == ("Question: Which statement best explains why photosynthesis is the "
                                         "foundation of most food webs?\nAnswer:")
    _, challenge = real_docs("arc_challenge")
    assert len(challenge) == 1172 and all(2 <= len(d["choices"]) <= 5 for d in challenge)


def test_real_hellaswag_file():
    task, docs = real_docs("hellaswag")
    assert len(docs) == 1000 and docs[0]["gold"] == 3 and len(task.doc_to_choice(docs[0])) == 4
    assert task.doc_to_text(docs[0]) == "Roof shingle removal: A man is sitting on a roof. he"


def test_real_winogrande_boolq_copa_files():
    wino, docs = real_docs("winogrande")
    assert len(docs) == 1267 and docs[0]["gold"] == 1
    reqs = wino.requests(docs[0], "")
    assert reqs[1].context.endswith("so Maria") and reqs[1].continuation == " always got the easier cases."
    boolq, docs = real_docs("boolq")
    assert len(docs) == 3270 and {d["label"] for d in docs} == {0, 1}
    assert boolq.doc_to_text(docs[0]).endswith("\nQuestion: does ethanol take more energy make that produces?"
                                              "\nAnswer:")
    assert not boolq.doc_to_text(docs[0]).startswith("Passage:")
    copa, docs = real_docs("copa")
    assert len(docs) == 100 and copa.doc_to_text(docs[0]) == "The man turned on the faucet therefore"
    assert copa.doc_to_choice(docs[0]) == [" the toilet filled with water.", " water flowed from the spout."]


def test_real_mmlu_dev_and_truthfulqa_files():
    mmlu, docs = real_docs("mmlu_dev")
    assert len(docs) == 285 and docs[0]["subject"] == "abstract_algebra" and docs[0]["gold"] == 1
    assert len({d["subject"] for d in docs}) == 57
    ctx = mmlu.fewshot_context(docs[0], 4)
    assert ctx.count("\nAnswer:") == 5 and ctx.startswith("The following are multiple choice questions "
                                                          "(with answers) about abstract algebra.\n\n")
    mc1, docs = real_docs("truthfulqa_mc1")
    assert len(docs) == 817 and docs[0]["question"] == "What happens to you if you eat watermelon seeds?"
    assert mc1.doc_to_choice(docs[0])[0] == "The watermelon seeds pass through your digestive system."
    assert len(mc1.doc_to_choice(docs[0])) == 8
    assert len(get_task("truthfulqa_mc2").doc_to_choice(docs[0])) == 12


# -- end to end on the tiny random model -------------------------------------------------------------------
def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """ARC, COPA and Winogrande files of 25 items each, made of the tiny tokenizer's words."""
    rng = random.Random(0)
    root = tmp_path / "data"
    files = {
        "arc/arc_easy_test.jsonl": [{"query": "Question: " + sentence(rng, 8) + "?",
                                     "choices": [sentence(rng, rng.randint(1, 4)) for _ in range(4)],
                                     "gold": rng.randrange(4)} for _ in range(25)],
        "superglue/copa_dev.jsonl": [{"query": sentence(rng, 6) + ", " + rng.choice(["because", "therefore"]),
                                      "choices": [sentence(rng, 4) + ".", sentence(rng, 4) + "."],
                                      "gold": rng.randrange(2)} for _ in range(25)],
        "winogrande/winogrande_dev.jsonl": [{"sentence": sentence(rng, 5) + " _ " + sentence(rng, 4) + ".",
                                             "option1": rng.choice(WORDS), "option2": rng.choice(WORDS),
                                             "answer": rng.choice("12")} for _ in range(25)],
    }
    for rel, rows in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setenv("LMSTACK_DATA", str(root))
    return root


def test_end_to_end_three_tasks_on_the_tiny_model(tiny_lm, tiny_data, tmp_path):
    out = evaluate(tiny_lm, ["arc_easy", "copa", "winogrande"], limit=20, bootstrap_iters=200,
                   out_dir=tmp_path / "eval", progress=False)
    res = out["results"]
    assert out["config"]["limit"] == 20
    for name, chance, metrics in [("arc_easy", 0.25, {"acc", "acc_norm", "ece"}),
                                  ("copa", 0.5, {"acc", "ece"}), ("winogrande", 0.5, {"acc", "ece"})]:
        entry = res[name]
        assert entry["n"] == 20 and entry["chance"] == chance
        assert {k for k in entry["metrics"] if not k.endswith("_stderr")} == metrics
        for m in metrics:
            assert 0.0 <= entry["metrics"][m] <= 1.0
            assert entry["metrics"][f"{m}_stderr"] >= 0.0
        assert entry["metrics"]["acc_stderr"] > 0   # a random model is right on some items, wrong on others
        samples = (tmp_path / "eval" / f"samples_{name}.jsonl").read_text().splitlines()
        assert len(samples) == 20
        first = json.loads(samples[0])
        assert len(first["responses"]) == len(first["requests"]) == (4 if name == "arc_easy" else 2)
    saved = json.loads((tmp_path / "eval/results.json").read_text())
    assert saved["results"]["copa"]["chance"] == 0.5


def test_end_to_end_real_files_on_the_tiny_model(tiny_lm):
    """Every standard task with data present, --limit 8 (kept small for speed), through the real loaders (prompts longer than the
    tiny model's 128-token window are left-truncated with a warning, as lm-eval does)."""
    names = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "copa", "truthfulqa_mc1",
             "truthfulqa_mc2"]
    tasks = [get_task(n) for n in names + ["mmlu_dev"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate(tiny_lm, tasks, limit=8, bootstrap_iters=100, progress=False)
    ran = {k: v for k, v in out["results"].items() if "skipped" not in v}
    if not ran:
        pytest.skip("no standard-task data under ../shared/data")
    for name, entry in ran.items():
        assert entry["n"] == 8 and entry["chance"] is not None and 0 < entry["chance"] < 1
        assert "acc" in entry["metrics"] and "acc_stderr" in entry["metrics"] and "ece" in entry["metrics"]
