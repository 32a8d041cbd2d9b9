"""Request-level parity with lm-evaluation-harness: for the first items of each real file, lm-eval (its own
task YAMLs and utils, included by local YAMLs that read the same records in Hugging Face layout) builds
exactly the (context, continuation) pairs our tasks build, and its process_results gives the same acc /
acc_norm on the same scripted log-likelihoods.

Slow (importing lm-eval and building its datasets takes a while); needs lm-eval and ../shared/data.
"""
import csv
import json
import os
import random
import shutil

import pytest

from lmstack.eval.task import TaskDataMissing, data_dir, get_task

pytestmark = pytest.mark.slow
N = 40

# Each local task includes lm-eval's own task YAML (so its templates and utils functions are used as
# shipped) and only points the dataset at a local JSON file.
INCLUDE = {
    "arc_easy": "arc/arc_easy.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "copa": "super_glue/copa/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
    "mmlu_abstract_algebra": "mmlu/default/_default_template_yaml",
}
EXTRA = {  # what lm-eval's per-subject MMLU YAML adds to the template
    "mmlu_abstract_algebra": "fewshot_split: dev\nnum_fewshot: 5\ndescription: \"The following are multiple "
                             "choice questions (with answers) about abstract algebra.\\n\\n\"\n",
}


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def to_hf(name: str, row: dict) -> dict:
    """A shared-data record in the Hugging Face layout lm-eval reads."""
    if name == "arc_easy":
        labels = list("ABCDE")[:len(row["choices"])]
        return {"question": row["query"].removeprefix("Question: "), "answerKey": labels[row["gold"]],
                "choices": {"text": row["choices"], "label": labels}}
    if name == "hellaswag":
        activity, _, ctx = row["ctx"].partition(": ")
        cut = ctx.rfind(". ") + 2 if ". " in ctx else 0   # ctx_b: the unfinished last sentence
        return {"activity_label": activity, "ctx_a": ctx[:cut].rstrip(), "ctx_b": ctx[cut:],
                "endings": row["endings"], "label": str(row["label"])}
    if name == "boolq":
        passage, _, question = row["query"].rpartition("\nQuestion: ")
        return {"passage": passage.removeprefix("Passage: "), "question": question[:-1], "label": row["gold"]}
    if name == "copa":
        stem, _, word = row["query"].rpartition(" ")
        return {"premise": stem.rstrip(",") + ".", "question": {"because": "cause", "therefore": "effect"}[word],
                "choice1": upper_first(row["choices"][0]), "choice2": upper_first(row["choices"][1]),
                "label": row["gold"]}
    if name == "winogrande":
        a, b = row["context_options"]
        prefix = _common_prefix(a, b)
        return {"sentence": prefix + "_ " + row["continuation"], "option1": a[len(prefix):],
                "option2": b[len(prefix):], "answer": str(row["gold"] + 1)}
    raise KeyError(name)


def tqa_to_hf(row: dict) -> dict:
    """A CSV row as HF's truthful_qa multiple_choice record (answers closed with a period, as the JSON's)."""
    def close(a):
        return a.strip() if a.strip().endswith(".") else a.strip() + "."
    correct = [close(a) for a in row["Correct Answers"].split(";") if a.strip()]
    incorrect = [close(a) for a in row["Incorrect Answers"].split(";") if a.strip()]
    return {"question": row["Question"].strip(),
            "mc1_targets": {"choices": [close(row["Best Answer"])] + incorrect, "labels": [1] + [0] * len(incorrect)},
            "mc2_targets": {"choices": correct + incorrect, "labels": [1] * len(correct) + [0] * len(incorrect)}}


FILES = {"arc_easy": "arc/arc_easy_test.jsonl", "hellaswag": "hellaswag/hellaswag_val_first1000.jsonl",
         "boolq": "superglue/boolq_dev.jsonl", "copa": "superglue/copa_dev.jsonl",
         "winogrande": "winogrande/winogrande_dev.jsonl"}


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    pytest.importorskip("lm_eval")
    if not (data_dir() / "arc").is_dir():
        pytest.skip(f"no shared data under {data_dir()}")
    from lm_eval.tasks import TaskManager, get_task_dict

    root = tmp_path_factory.mktemp("lmeval")
    env = pytest.MonkeyPatch()   # module-scoped, so undone by hand below
    env.setenv("HF_HUB_OFFLINE", "1")
    env.setenv("HF_DATASETS_OFFLINE", "1")
    env.setenv("HF_DATASETS_CACHE", str(root / "cache"))
    import lm_eval.tasks

    yaml_root = os.path.dirname(lm_eval.tasks.__file__)
    for name, rel in FILES.items():
        rows = [json.loads(line) for line in (data_dir() / rel).read_text(encoding="utf-8").splitlines()[:N]]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(to_hf(name, r)) + "\n" for r in rows))
    # MMLU: the dev file is the few-shot split; its rows, marked, stand in for a test split.
    mmlu = root / "mmlu"
    for split in ("dev", "test"):
        (mmlu / split).mkdir(parents=True)
    shutil.copy(data_dir() / "mmlu/dev/abstract_algebra_dev.csv", mmlu / "dev/abstract_algebra_dev.csv")
    dev_rows = list(csv.reader(open(mmlu / "dev/abstract_algebra_dev.csv", encoding="utf-8")))[1:]
    with open(mmlu / "test/abstract_algebra_test.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["(t) " + r[0], *r[1:5], "ABCD"[int(r[5])]] for r in dev_rows])
    for split in ("dev", "test"):
        rows = [{"question": q, "choices": [a, b, c, d], "answer": int(ans) if ans.isdigit() else "ABCD".index(ans)}
                for q, a, b, c, d, ans in list(csv.reader(open(mmlu / split / f"abstract_algebra_{split}.csv")))
                if q != "question"]
        (root / f"mmlu_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tqa = list(csv.DictReader(open(data_dir() / "truthfulqa/TruthfulQA.csv", encoding="utf-8")))[:N]
    (root / "truthfulqa_mc1.jsonl").write_text("".join(json.dumps(tqa_to_hf(r)) + "\n" for r in tqa))
    for name, include in INCLUDE.items():
        files = ({"test": str(root / "mmlu_test.jsonl"), "dev": str(root / "mmlu_dev.jsonl")}
                 if name.startswith("mmlu") else {"test": str(root / f"{name}.jsonl")})
        (root / f"{name}_local.yaml").write_text(
            f"include: {os.path.join(yaml_root, include)}\ntask: {name}_local\ntag: []\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files: {json.dumps(files)}\ntraining_split: null\n"
            f"validation_split: null\ntest_split: test\n{EXTRA.get(name, '')}")
    tm = TaskManager(include_path=str(root), include_defaults=False)
    tasks = get_task_dict([f"{n}_local" for n in INCLUDE], tm)
    for task in tasks.values():
        task.build_all_requests(limit=N)
    yield tasks, root
    env.undo()


def ours(name, root, layout="hf"):
    """Our task and its first N docs: from the same Hugging Face rows lm-eval reads ("hf"), or from the
    shared copy's own layout ("shared")."""
    if name.startswith("mmlu"):
        task = get_task(name, path=str(root / "mmlu"))
        return task, task.cached_docs("test")[:N], 5
    if name == "truthfulqa_mc1" or layout == "shared":
        task = get_task(name)
    else:
        task = get_task(name, path=str(root / f"{name}.jsonl"))
    try:
        return task, task.cached_docs(task.eval_split)[:N], 0
    except TaskDataMissing as e:
        pytest.skip(str(e))


def request_pairs(task, docs, shots):
    return [[(r.context, r.continuation) for r in task.requests(d, task.fewshot_context(d, shots))] for d in docs]


@pytest.mark.parametrize("name", list(INCLUDE))
def test_requests_match_lm_eval(name, lm_eval_tasks):
    tasks, root = lm_eval_tasks
    theirs = tasks[f"{name}_local"]
    task, docs, shots = ours(name, root)
    by_doc: dict[int, list] = {}
    for inst in theirs.instances:
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, inst.arguments))
    assert len(by_doc) == len(docs)
    got = request_pairs(task, docs, shots)
    for i in range(len(docs)):
        assert got[i] == [args for _, args in sorted(by_doc[i])], f"{name} item {i}"
    # The shared copy's own layout gives the same requests (HellaSwag's joined ctx lost one capital letter,
    # see its docstring, so it is compared without case).
    if name in FILES:
        shared = request_pairs(*ours(name, root, "shared"))
        if name == "hellaswag":
            got, shared = ([[(c.lower(), x) for c, x in item] for item in pairs] for pairs in (got, shared))
        assert shared == got


@pytest.mark.parametrize("name", ["arc_easy", "hellaswag", "copa", "winogrande"])
def test_metrics_match_lm_eval_on_scripted_loglikelihoods(name, lm_eval_tasks):
    tasks, root = lm_eval_tasks
    theirs = tasks[f"{name}_local"]
    task, docs, _ = ours(name, root)
    their_docs = list(theirs.eval_docs)[:N]
    rng = random.Random(0)
    for doc, their_doc in zip(docs, their_docs):
        n = len(task.doc_to_choice(doc))
        responses = [(rng.uniform(-30, -1), False) for _ in range(n)]
        want = theirs.process_results(their_doc, responses)
        got = task.process_results(doc, responses)
        for metric in ("acc", "acc_norm"):
            if metric in want:
                assert got[metric] == want[metric], f"{name} {metric}"
