"""Task base class and registry: few-shot sampling, raw and chat prompts, default requests and results."""
import pytest

from lmstack.errors import LmstackError
from lmstack.eval.lm import GenerateUntil, Loglikelihood, Rolling
from lmstack.eval.task import Task, TaskDataMissing, data_dir, get_task, list_tasks, register_task

DOCS = [{"q": f"{i} + 1", "choices": [str(i + 1), str(i + 2), "x"], "gold": 0} for i in range(10)]


class Toy(Task):
    eval_split = "test"

    def docs(self, split):
        if split == "missing":
            raise TaskDataMissing("toy: no such file")
        return [dict(d, split=split) for d in DOCS]

    def doc_to_text(self, doc):
        return f"Q: {doc['q']}\nA:"

    def doc_to_choice(self, doc):
        return doc["choices"]

    def doc_to_target(self, doc):
        return doc["gold"]


register_task("core_toy_mc")(Toy)
register_task("core_toy_train_shots", fewshot_split="train")(Toy)


def test_registry_lists_and_builds_tasks():
    assert {"core_toy_mc", "core_toy_train_shots"} <= set(list_tasks())
    task = get_task("core_toy_train_shots")
    assert isinstance(task, Toy) and task.name == "core_toy_train_shots" and task.fewshot_split == "train"
    assert get_task("core_toy_mc", target_delimiter="=").target_delimiter == "="


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(LmstackError, match=r"unknown task 'no_such_task'; available tasks: .*core_toy_mc"):
        get_task("no_such_task")


def test_unknown_setting_is_an_error():
    with pytest.raises(LmstackError, match="no setting 'shots'"):
        get_task("core_toy_mc", shots=3)
    with pytest.raises(LmstackError, match="output_type"):
        get_task("core_toy_mc", output_type="essay")


def test_fewshot_is_seeded_and_never_the_item_itself():
    task = get_task("core_toy_mc")
    docs = task.cached_docs("test")
    for doc in docs:
        shots = task.fewshot_docs(doc, 3, seed=1)
        assert len(shots) == 3 and doc not in shots
        assert shots == task.fewshot_docs(doc, 3, seed=1)
    assert any(task.fewshot_docs(docs[0], 3, seed=1) != task.fewshot_docs(docs[0], 3, seed=s) for s in range(2, 6))
    # A transformed copy of an item (HELM perturbations) must not get the original as a shot either.
    copy = dict(docs[0], q="changed")
    for seed in range(20):
        assert docs[0] not in task.fewshot_docs(copy, 3, seed=seed, exclude=docs[0])
    with pytest.raises(LmstackError, match="only 9 others"):
        task.fewshot_docs(docs[0], 10)


def test_fewshot_comes_from_the_fewshot_split():
    task = get_task("core_toy_train_shots")
    doc = task.cached_docs("test")[0]
    assert all(s["split"] == "train" for s in task.fewshot_docs(doc, 4))


def test_raw_prompt_layout():
    task = get_task("core_toy_mc", description="Math.\n\n")
    doc = task.cached_docs("test")[0]
    shots = task.fewshot_docs(doc, 2, seed=5)
    ctx = task.fewshot_context(doc, 2, seed=5)
    expected = ("Math.\n\n" + f"Q: {shots[0]['q']}\nA: {shots[0]['choices'][0]}\n\n"
                f"Q: {shots[1]['q']}\nA: {shots[1]['choices'][0]}\n\n" + "Q: 0 + 1\nA:")
    assert ctx == expected
    assert task.fewshot_context(doc, 0) == "Math.\n\nQ: 0 + 1\nA:"


def test_chat_prompt_turns_shots_into_user_assistant_pairs(tiny_lm):
    task = get_task("core_toy_mc")
    doc = task.cached_docs("test")[0]
    seen = []
    ctx = task.fewshot_context(doc, 2, seed=5, chat=lambda m: seen.append(m) or "RENDERED")
    assert ctx == "RENDERED"
    roles = [m["role"] for m in seen[0]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert seen[0][-1]["content"] == "Q: 0 + 1\nA:"
    rendered = task.fewshot_context(doc, 1, seed=5, chat=tiny_lm.render_chat)
    assert rendered.startswith("<|bos|><|user_start|>") and rendered.endswith("<|assistant_start|>")


def test_default_requests_per_output_type():
    task = get_task("core_toy_mc")
    doc = task.cached_docs("test")[0]
    reqs = task.requests(doc, "CTX")
    assert reqs == [Loglikelihood("CTX", " 1"), Loglikelihood("CTX", " 2"), Loglikelihood("CTX", " x")]
    assert task.chance(doc) == pytest.approx(1 / 3)
    task.output_type = "loglikelihood"   # doc_to_target is then the target text itself (here str(0))
    assert task.requests(doc, "CTX") == [Loglikelihood("CTX", " 0")]
    task.output_type = "rolling"
    assert task.requests(doc, "CTX") == [Rolling("Q: 0 + 1\nA:")]
    task.output_type = "generate_until"
    [gen] = task.requests(doc, "CTX")
    assert isinstance(gen, GenerateUntil) and gen.args.until == ["\n\n"] and task.chance(doc) is None


def test_process_results_multiple_choice_acc_and_acc_norm():
    task = get_task("core_toy_mc")
    doc = {"q": "q", "choices": ["a", "bbbbbb"], "gold": 1}
    assert task.process_results(doc, [(-2.0, False), (-3.0, False)]) == {"acc": 0.0, "acc_norm": 1.0}
    task.output_type = "generate_until"
    assert task.process_results({"q": "q", "choices": [], "gold": "a"}, [" A "]) == {"exact_match": 1.0}
    assert task.process_results({"q": "q", "choices": [], "gold": "b"}, [" A "]) == {"exact_match": 0.0}


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSTACK_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("LMSTACK_DATA")
    assert data_dir().name == "data" and data_dir().parent.name == "shared"
