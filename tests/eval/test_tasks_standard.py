"""Standard benchmark tasks: exact prompt strings on hand-written docs (both record layouts), loaders,
bad input and missing data. Scoring is in test_tasks_standard_scoring.py, real files and end-to-end runs
in test_tasks_standard_e2e.py."""
import csv
import json

import pytest

from lmstack.errors import LmstackError
from lmstack.eval.evaluator import evaluate
from lmstack.eval.lm import Loglikelihood
from lmstack.eval.task import TaskDataMissing, get_task
from lmstack.eval.tasks.mmlu import read_mmlu_csv
from lmstack.eval.tasks.standard import hellaswag_preprocess


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(reqs):
    return [(r.context, r.continuation) for r in reqs]


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_DATA", str(tmp_path))
    return tmp_path


# -- ARC ---------------------------------------------------------------------------------------------------
ARC_SHARED = {"query": "Question: Which gas do plants take in?", "choices": ["Oxygen", "Carbon dioxide"], "gold": 1}
ARC_HF = {"question": "Which gas do plants take in?", "answerKey": "B",
          "choices": {"text": ["Oxygen", "Carbon dioxide"], "label": ["A", "B"]}}
ARC_AI2 = {"question": {"stem": "Which gas do plants take in?",
                        "choices": [{"text": "Oxygen", "label": "1"}, {"text": "Carbon dioxide", "label": "2"}]},
           "answerKey": "2"}


def test_arc_prompt_is_lm_evals_for_every_record_layout():
    task = get_task("arc_easy")
    for row in (ARC_SHARED, ARC_HF, ARC_AI2):
        doc = task.parse_row(row, "x:1")
        ctx = task.fewshot_context(doc, 0)
        assert ctx == "Question: Which gas do plants take in?\nAnswer:"
        assert pairs(task.requests(doc, ctx)) == [(ctx, " Oxygen"), (ctx, " Carbon dioxide")]
        assert task.doc_to_target(doc) == 1 and task.chance(doc) == 0.5


def test_arc_fewshot_uses_other_items_joined_by_blank_lines(data_root):
    rows = [{"query": f"Question: q{i}?", "choices": ["a", "b"], "gold": i % 2} for i in range(5)]
    write_jsonl(data_root / "arc/arc_challenge_test.jsonl", rows)
    task = get_task("arc_challenge")
    doc = task.cached_docs("test")[0]
    ctx = task.fewshot_context(doc, 2, seed=3)
    shots = ctx.split("\n\n")
    assert len(shots) == 3 and shots[-1] == "Question: q0?\nAnswer:"
    for shot in shots[:2]:  # "Question: qi?\nAnswer: <gold choice>", never the item itself
        i = int(shot.split("?")[0].removeprefix("Question: q"))
        assert i != 0 and shot == f"Question: q{i}?\nAnswer: {'ab'[i % 2]}"
    assert ctx == task.fewshot_context(doc, 2, seed=3)  # fixed seed, same shots


def test_arc_bad_answer_key_names_the_line():
    with pytest.raises(LmstackError, match=r"f\.jsonl:7.*answerKey 'E'"):
        get_task("arc_easy").parse_row({**ARC_HF, "answerKey": "E"}, "f.jsonl:7")


# -- HellaSwag ---------------------------------------------------------------------------------------------
def test_hellaswag_preprocess_matches_lm_eval_rules():
    assert hellaswag_preprocess(" How to cook [title] Boil water. [step] Add  salt. ") == \
        "How to cook. Boil water. Add salt."


def test_hellaswag_prompt_from_raw_and_shared_rows():
    task = get_task("hellaswag")
    raw = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
           "endings": ["is using wrap.", "starts pulling up roofing [step] now."], "label": "1"}
    doc = task.parse_row(raw, "x:1")
    ctx = task.fewshot_context(doc, 0)
    assert ctx == "Roof shingle removal: A man is sitting on a roof. He"     # ctx_b capitalised, as lm-eval
    assert pairs(task.requests(doc, ctx)) == [(ctx, " is using wrap."), (ctx, " starts pulling up roofing now.")]
    shared = task.parse_row({"ctx": "Roof shingle removal: A man is sitting on a roof. he",
                             "endings": ["a", "b", "c", "d"], "label": 3}, "x:2")
    assert task.doc_to_text(shared) == "Roof shingle removal: A man is sitting on a roof. he"
    assert task.doc_to_target(shared) == 3 and task.chance(shared) == 0.25
    with pytest.raises(LmstackError, match="out of range"):
        task.parse_row({"ctx": "c", "endings": ["a", "b"], "label": 2}, "x:3")


# -- BoolQ / COPA ------------------------------------------------------------------------------------------
def test_boolq_prompt_drops_the_passage_prefix():
    task = get_task("boolq")
    shared = {"query": "Passage: Cats are mammals.\nQuestion: is a cat a mammal?", "choices": ["no", "yes"],
              "gold": 1}
    hf = {"passage": "Cats are mammals.", "question": "is a cat a mammal", "label": True}
    for row in (shared, hf):
        doc = task.parse_row(row, "x:1")
        ctx = task.fewshot_context(doc, 0)
        assert ctx == "Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:"
        assert pairs(task.requests(doc, ctx)) == [(ctx, " no"), (ctx, " yes")]
        assert task.doc_to_target(doc) == 1
    with pytest.raises(LmstackError, match="not a BoolQ record"):
        task.parse_row({"query": "no question here", "choices": ["no", "yes"], "gold": 0}, "x:2")


def test_copa_prompt_connectors_and_lowercased_choices():
    task = get_task("copa")
    shared = {"query": "The man fell, because", "choices": ["He slipped.", "he sang."], "gold": 0}
    hf = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
          "label": 0}
    for row in (shared, hf):
        doc = task.parse_row(row, "x:1")
        ctx = task.fewshot_context(doc, 0)
        assert ctx == "The man fell because"
        # lm-eval's choices carry a leading space and the delimiter adds another: two spaces, on purpose.
        assert pairs(task.requests(doc, ctx)) == [(ctx, "  he slipped."), (ctx, "  he sang.")]
    effect = task.parse_row({"query": "It rained, therefore", "choices": ["a.", "b."], "gold": 1}, "x:2")
    assert task.doc_to_text(effect) == "It rained therefore"
    with pytest.raises(LmstackError, match="cause or effect"):
        task.parse_row({**hf, "question": "why"}, "x:3")


# -- Winogrande --------------------------------------------------------------------------------------------
def test_winogrande_partial_scoring_one_context_per_option():
    task = get_task("winogrande")
    hf = {"sentence": "Sarah was a better surgeon than Maria so _ always got the harder cases.",
          "option1": "Sarah", "option2": "Maria", "answer": "1"}
    shared = {"context_options": ["Sarah was a better surgeon than Maria so Sarah",
                                  "Sarah was a better surgeon than Maria so Maria"],
              "continuation": "always got the harder cases.", "gold": 0}
    for row in (hf, shared):
        doc = task.parse_row(row, "x:1")
        ctx = task.fewshot_context(doc, 0)
        assert ctx == ""
        assert pairs(task.requests(doc, ctx)) == [
            ("Sarah was a better surgeon than Maria so Sarah", " always got the harder cases."),
            ("Sarah was a better surgeon than Maria so Maria", " always got the harder cases.")]
        assert task.doc_to_target(doc) == 0 and task.chance(doc) == 0.5
    shot = task.parse_row({"sentence": "The cup fell off the shelf because _ was slippery.", "option1": "the cup",
                           "option2": "the shelf", "answer": "2"}, "x:2")
    assert task.fewshot_example(shot) == "The cup fell off the shelf because the shelf was slippery."
    reqs = task.requests(doc, task.fewshot_example(shot) + "\n\n")
    assert reqs[1] == Loglikelihood("The cup fell off the shelf because the shelf was slippery.\n\n"
                                    "Sarah was a better surgeon than Maria so Maria", " always got the harder cases.")
    with pytest.raises(LmstackError, match="no '_' blank"):
        task.parse_row({**hf, "sentence": "no blank"}, "x:3")


# -- MMLU --------------------------------------------------------------------------------------------------
MMLU_ROWS = [("What is 2+2?", "3", "4", "5", "6", 1), ("Pick, the third", "a", "b", "c", "d", 2),
             ("Which is a prime?", "4", "6", "7", "9", 2)]


def write_mmlu(folder, subject, split, header: bool):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        for *row, ans in MMLU_ROWS:
            w.writerow(row + [ans if header else "ABCD"[ans]])


def test_mmlu_reads_both_csv_layouts_the_same(tmp_path):
    write_mmlu(tmp_path / "a", "anatomy", "dev", header=True)
    write_mmlu(tmp_path / "b", "anatomy", "dev", header=False)
    with_header = read_mmlu_csv(tmp_path / "a/anatomy_dev.csv", "anatomy")
    berkeley = read_mmlu_csv(tmp_path / "b/anatomy_dev.csv", "anatomy")
    assert with_header == berkeley
    assert [d["gold"] for d in berkeley] == [1, 2, 2] and berkeley[1]["question"] == "Pick, the third"


def test_mmlu_prompt_description_and_first_n_dev_shots(data_root):
    write_mmlu(data_root / "mmlu/dev", "college_biology", "dev", header=True)
    write_mmlu(data_root / "mmlu/test", "college_biology", "test", header=False)
    task = get_task("mmlu_college_biology")
    doc = task.cached_docs("test")[2]
    assert task.fewshot_context(doc, 0) == (
        "The following are multiple choice questions (with answers) about college biology.\n\n"
        "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:")
    ctx = task.fewshot_context(doc, 2)
    assert ctx == ("The following are multiple choice questions (with answers) about college biology.\n\n"
                   "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                   "Pick, the third\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
                   "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:")
    assert [r.continuation for r in task.requests(doc, ctx)] == [" A", " B", " C", " D"]
    # "mmlu" takes every subject present; on the dev split an item's shots skip the item itself.
    dev = get_task("mmlu", eval_split="dev")
    first = dev.cached_docs("dev")[0]
    assert dev.fewshot_docs(first, 2) == dev.cached_docs("dev")[1:3]
    with pytest.raises(LmstackError, match="only 2 other dev rows"):
        dev.fewshot_context(first, 3)


def test_mmlu_bad_rows_and_subjects(tmp_path):
    (tmp_path / "x_dev.csv").write_text("q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(LmstackError, match=r"x_dev\.csv:1: answer must be A-D or 0-3"):
        read_mmlu_csv(tmp_path / "x_dev.csv", "x")
    (tmp_path / "y_dev.csv").write_text("q,a,b,A\n", encoding="utf-8")
    with pytest.raises(LmstackError, match="expected 6 columns"):
        read_mmlu_csv(tmp_path / "y_dev.csv", "y")
    with pytest.raises(LmstackError, match="unknown MMLU subject 'astrology'"):
        get_task("mmlu", subject="astrology")


# -- TruthfulQA --------------------------------------------------------------------------------------------
TQA_CSV = ("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
           "Adversarial,Misc,What happens if you eat seeds?,The seeds pass through you,"
           "Nothing happens; The seeds pass through you.,You grow plants; You die,src\n")


def test_truthfulqa_mc1_mc2_choices_and_prompt(data_root):
    (data_root / "truthfulqa").mkdir()
    (data_root / "truthfulqa/TruthfulQA.csv").write_text(TQA_CSV, encoding="utf-8")
    mc1, mc2 = get_task("truthfulqa_mc1"), get_task("truthfulqa_mc2")
    doc = mc1.cached_docs("validation")[0]
    ctx = mc1.fewshot_context(doc, 0)
    assert ctx.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
    assert ctx.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
                        "Q: What happens if you eat seeds?\nA:")
    assert [r.continuation for r in mc1.requests(doc, ctx)] == [
        " The seeds pass through you.", " You grow plants.", " You die."]
    assert [r.continuation for r in mc2.requests(doc, ctx)] == [
        " Nothing happens.", " The seeds pass through you.", " You grow plants.", " You die."]
    assert mc1.chance(doc) == pytest.approx(1 / 3) and mc2.chance(doc) == pytest.approx(2 / 4)


def test_truthfulqa_missing_column_is_named(tmp_path):
    (tmp_path / "t.csv").write_text("Question,Best Answer\nq,a\n", encoding="utf-8")
    with pytest.raises(LmstackError, match="lacks column.*Correct Answers, Incorrect Answers"):
        get_task("truthfulqa_mc1", path=str(tmp_path / "t.csv")).docs("validation")


# -- generic loaders ---------------------------------------------------------------------------------------
def test_generic_multiple_choice_loader(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"query": "Sky colour:", "choices": ["blue", "green", "red"],
                                               "gold": 0}])
    task = get_task("multiple_choice", path=str(path))
    doc = task.cached_docs("test")[0]
    ctx = task.fewshot_context(doc, 0)
    assert ctx == "Sky colour:" and [r.continuation for r in task.requests(doc, ctx)] == [" blue", " green", " red"]
    assert task.chance(doc) == pytest.approx(1 / 3)
    write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0},
                                         {"query": "q", "choices": ["a", "b"], "gold": 5}])
    with pytest.raises(LmstackError, match=r"bad\.jsonl:2: 'gold' must be an index in 0\.\.1"):
        get_task("multiple_choice", path=str(tmp_path / "bad.jsonl")).docs("test")
    write_jsonl(tmp_path / "keys.jsonl", [{"question": "q", "answers": ["a"]}])
    with pytest.raises(LmstackError, match="lacks query, choices, gold"):
        get_task("multiple_choice", path=str(tmp_path / "keys.jsonl")).docs("test")
    with pytest.raises(LmstackError, match="needs path="):
        get_task("multiple_choice").docs("test")


def test_lambada_loader_splits_text_and_joins_with_a_space(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "the cat sat on the mat"},
                                              {"context": "He opened the", "continuation": "door"},
                                              {"context": "Say ", "continuation": "hi"}])
    task = get_task("lambada", path=str(path))
    docs = task.cached_docs("test")
    assert [pairs(task.requests(d, task.fewshot_context(d, 0)))[0] for d in docs] == [
        ("the cat sat on the", " mat"), ("He opened the", " door"), ("Say ", "hi")]
    assert task.chance(docs[0]) is None
    write_jsonl(tmp_path / "bad.jsonl", [{"context": "x"}])
    with pytest.raises(LmstackError, match=r"bad\.jsonl:1: expected \{context, continuation\}"):
        get_task("lambada", path=str(tmp_path / "bad.jsonl")).docs("test")


# -- missing data ------------------------------------------------------------------------------------------
STANDARD = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "copa", "mmlu", "mmlu_dev", "mmlu_anatomy",
            "truthfulqa_mc1", "truthfulqa_mc2", "lambada"]


@pytest.mark.parametrize("name", STANDARD)
def test_missing_data_raises_task_data_missing_naming_the_path(name, data_root):
    task = get_task(name)
    with pytest.raises(TaskDataMissing, match=str(data_root)):
        task.docs(task.eval_split)


def test_evaluate_skips_tasks_without_data_and_goes_on(data_root, fake_lm_factory, capsys):
    write_jsonl(data_root / "superglue/copa_dev.jsonl",
                [{"query": "It rained, therefore", "choices": ["the ground got wet.", "x."], "gold": 0}])
    out = evaluate(fake_lm_factory(), ["arc_easy", "copa", "mmlu"], bootstrap_iters=0, progress=False)
    res = out["results"]
    assert "arc/arc_easy_test.jsonl" in res["arc_easy"]["skipped"]
    assert "mmlu/test/abstract_algebra_test.csv" in res["mmlu"]["skipped"]
    assert res["copa"]["n"] == 1 and "skipped" not in res["copa"]
    assert "skipping arc_easy" in capsys.readouterr().out
