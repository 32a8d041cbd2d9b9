"""lm-eval task YAMLs from --include_path: every supported feature on a scripted LM, and every refusal."""
import json
import math

import pytest

from lmstack.errors import LmstackError
from lmstack.eval.evaluator import evaluate
from lmstack.eval.task_args import resolve_tasks
from lmstack.eval.yaml_loader import load_task_dir

MC_ROWS = [{"question": f"What is {i}+1?", "options": [str(i + 1), str(i + 2), "cat"], "label": i % 2}
           for i in range(6)]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "tasks"
    jsonl(d / "mc.jsonl", MC_ROWS)
    write(d / "_base.yaml", "dataset_path: json\noutput_type: multiple_choice\n"
                            "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
                            "  - metric: exact_match\n  - metric: acc_bytes\n")
    write(d / "mc.yaml", """include: _base.yaml
task: my_mc
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
description: "Arithmetic.\\n\\n"
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: options
fewshot_config:
  sampler: first_n
""")
    return d


def test_multiple_choice_prompts_requests_and_metrics(task_dir, fake_lm_factory):
    [task] = resolve_tasks("my_mc", str(task_dir))
    # choice "2" (index 0) of item 0 scores best; elsewhere the shortest choice wins (FakeLM: -len)
    lm = fake_lm_factory(loglikelihood={("Arithmetic.\n\nQ: What is 0+1?\nA:", " 1"): (-0.5, True)})
    out = evaluate(lm, [task], bootstrap_iters=0, progress=False)["results"]["my_mc"]
    assert ("loglikelihood", "Arithmetic.\n\nQ: What is 0+1?\nA:", " 1") in lm.calls
    assert out["n"] == 6 and set(out["metrics"]) >= {"acc", "acc_norm", "acc_bytes", "exact_match"}
    # item 0 (gold 0): picked 0, greedy -> 1; items 1..5: the two one-char choices tie, the first wins
    # (index 0), right when gold is 0 (items 2, 4): acc = 3/6; exact_match only item 0
    assert out["metrics"]["acc"] == pytest.approx(3 / 6)
    assert out["metrics"]["exact_match"] == pytest.approx(1 / 6)
    assert out["metrics"]["acc_bytes"] == out["metrics"]["acc_norm"]   # ASCII choices: bytes = characters


def test_fewshot_first_n_and_delimiters(task_dir, fake_lm_factory):
    [task] = resolve_tasks("my_mc:target_delimiter=\" => \",fewshot_delimiter=\"\\n##\\n\"", str(task_dir))
    ctx = task.fewshot_context(task.cached_docs("test")[3], num_fewshot=2)
    # first_n: the first two docs of the pool, each "text + target_delimiter + answer" + fewshot_delimiter
    assert ctx == ("Arithmetic.\n\nQ: What is 0+1?\nA: => 1\n##\nQ: What is 1+1?\nA: => 3\n##\n"
                   "Q: What is 3+1?\nA:")
    # the eval doc itself is never its own shot
    first = task.fewshot_context(task.cached_docs("test")[0], num_fewshot=1)
    assert "What is 1+1?\nA: => 3" in first and first.count("0+1") == 1


def test_num_fewshot_from_yaml_unless_the_command_sets_it(task_dir, fake_lm_factory):
    text = (task_dir / "mc.yaml").read_text().replace("task: my_mc", "task: mc2\nnum_fewshot: 2")
    write(task_dir / "mc2.yaml", text)
    [task] = resolve_tasks("mc2", str(task_dir))
    lm = fake_lm_factory()
    evaluate(lm, [task], num_fewshot=None, limit=1, bootstrap_iters=0, progress=False)
    assert lm.calls[0][1].count("Q:") == 3      # two shots + the question
    lm = fake_lm_factory()
    evaluate(lm, [task], num_fewshot=0, limit=1, bootstrap_iters=0, progress=False)
    assert lm.calls[0][1].count("Q:") == 1
    [task] = resolve_tasks("mc2:num_fewshot=1", str(task_dir))      # a task argument overrides the YAML's
    lm = fake_lm_factory()
    evaluate(lm, [task], num_fewshot=None, limit=1, bootstrap_iters=0, progress=False)
    assert task.num_fewshot == 1 and lm.calls[0][1].count("Q:") == 2


def test_generate_until_with_regex_filter_and_exact_match_options(tmp_path, fake_lm_factory):
    d = tmp_path / "t"
    jsonl(d / "gen.jsonl", [{"q": "2+2", "a": "4"}, {"q": "3+3", "a": "6"}, {"q": "1+1", "a": "2"}])
    write(d / "gen.yaml", """task: my_gen
dataset_path: json
dataset_kwargs: {data_files: {validation: gen.jsonl}}
validation_split: validation
output_type: generate_until
doc_to_text: "Q: {{q}}\\nA:"
doc_to_target: "{{a}}"
generation_kwargs: {until: ["\\n\\n", "Q:"], max_gen_toks: 12}
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "The answer is (\\\\d+)"
      - function: take_first
  - name: flexible
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
        group_select: -1
      - function: take_first
""")
    [task] = resolve_tasks("my_gen", str(d))
    answers = {"Q: 2+2\nA:": " The answer is 4.", "Q: 3+3\nA:": " it is 6 or 7", "Q: 1+1\nA:": " 2 Q: more"}
    lm = fake_lm_factory(generate=lambda ctx, args: answers[ctx])
    out = evaluate(lm, [task], bootstrap_iters=0, progress=False)["results"]["my_gen"]["metrics"]
    _, _, args = lm.calls[0]
    assert args.until == ["\n\n", "Q:"] and args.max_gen_toks == 12 and args.temperature == 0.0
    # strict: only "The answer is 4"; flexible: last number -> 4, 7 (wrong), 2
    assert out["exact_match,strict-match"] == pytest.approx(1 / 3)
    assert out["exact_match,flexible"] == pytest.approx(2 / 3)


def test_loglikelihood_and_rolling_output_types(tmp_path, fake_lm_factory):
    d = tmp_path / "t"
    write(d / "rows.csv", "context,word,text,n\nThe cat,sat,hello big world,1\nA dog,ran,one two,2\n")
    common = "dataset_path: csv\ndataset_kwargs:\n  data_files: rows.csv\ntest_split: train\n"
    write(d / "ll.yaml", "task: my_ll\n" + common + "output_type: loglikelihood\ndoc_to_text: context\n"
                                                     "doc_to_target: \"{{' ' + word}}\"\n")
    write(d / "roll.yaml", "task: my_roll\n" + common + "output_type: loglikelihood_rolling\n"
                                                         "doc_to_text: ''\ndoc_to_target: text\n")
    ll_task, roll_task = resolve_tasks("my_ll,my_roll", str(d))
    assert ll_task.cached_docs("train")[1]["n"] == 2          # csv columns typed as pandas types them
    lm = fake_lm_factory(loglikelihood={("The cat", " sat"): (-1.0, True), ("A dog", " ran"): (-3.0, False)},
                         rolling=lambda text: -float(len(text.encode())))
    out = evaluate(lm, [ll_task, roll_task], bootstrap_iters=0, progress=False)["results"]
    assert out["my_ll"]["metrics"]["acc"] == 0.5
    assert out["my_ll"]["metrics"]["perplexity"] == pytest.approx(math.exp(2.0))
    roll = out["my_roll"]["metrics"]
    assert ("rolling", "hello big world") in lm.calls
    assert roll["bits_per_byte"] == pytest.approx(1 / math.log(2))   # ll = -bytes
    assert roll["word_perplexity"] == pytest.approx(math.exp(22 / 5))   # 22 bytes over 5 words
    assert out["my_roll"]["higher_is_better"]["bits_per_byte"] is False


def test_choices_as_template_list_and_string_target(tmp_path, fake_lm_factory):
    d = tmp_path / "t"
    jsonl(d / "x.jsonl", [{"a": "red", "b": "blue", "gold": "blue"}])
    write(d / "x.yaml", "task: t1\ndataset_path: json\ndataset_kwargs: {data_files: {test: x.jsonl}}\n"
                        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: 'Color?'\n"
                        "doc_to_choice: \"{{[a, b]}}\"\ndoc_to_target: gold\n")
    write(d / "y.yaml", "task: t2\ninclude: x.yaml\ndoc_to_choice: ['red', 'blue']\ndoc_to_target: 1\n")
    jsonl(d / "parts" / "x1.jsonl", [{"a": "red", "b": "blue", "gold": "blue"}])
    jsonl(d / "parts" / "x2.jsonl", [{"a": "red", "b": "blue", "gold": "red"}])
    write(d / "z.yaml", "task: t3\ninclude: x.yaml\ndataset_kwargs: {data_files: {test: 'parts/x*.jsonl'}}\n")
    [task] = resolve_tasks("t3", str(d))
    assert [doc["gold"] for doc in task.cached_docs("test")] == ["blue", "red"]   # a glob, sorted
    for name in ("t1", "t2"):
        [task] = resolve_tasks(name, str(d))
        doc = task.cached_docs("test")[0]
        assert task.doc_to_choice(doc) == ["red", "blue"]
        lm = fake_lm_factory(loglikelihood={("Color?", " blue"): -0.1, ("Color?", " red"): -5.0})
        assert evaluate(lm, [task], bootstrap_iters=0, progress=False)["results"][name]["metrics"]["acc"] == 1.0


REFUSALS = [
    ("doc_to_text: !function utils.doc_to_text\n", "'doc_to_text': !function hooks are user Python"),
    ("process_docs: !function utils.process\n", "'process_docs': !function"),
    ("metric_list:\n  - metric: !function utils.m\n", "'metric_list.0.metric': !function"),
    ("dataset_path: allenai/ai2_arc\n", "'dataset_path': 'allenai/ai2_arc': only local files"),
    ("repeats: 4\n", "'repeats'"),
    ("metric_list:\n  - metric: bleu\n", "'metric_list.0.metric': 'bleu' is not supported"),
    ("metric_list:\n  - metric: exact_match\n    aggregation: median\n", "'metric_list.0.aggregation'"),
    ("filter_list:\n  - name: x\n    filter:\n      - function: majority_vote\n", "'filter_list.0.filter.0.function'"),
    ("dataset_kwargs: {data_files: {test: x.jsonl}, trust_remote_code: true}\n", "'dataset_kwargs.trust_remote_code'"),
    ("mystery_key: 1\n", "'mystery_key': not a key"),
    ("use_prompt: promptsource:x\n", "'use_prompt'"),
]


@pytest.mark.parametrize("extra, message", REFUSALS)
def test_unsupported_features_are_refused_naming_file_and_key(tmp_path, extra, message):
    d = tmp_path / "t"
    jsonl(d / "x.jsonl", MC_ROWS)
    (d / "utils.py").write_text("raise SystemExit('user code must never run')\n")
    base = ("task: bad\ndataset_path: json\ndataset_kwargs: {data_files: {test: x.jsonl}}\ntest_split: test\n"
            "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: label\n")
    keys = {line.split(":")[0] for line in extra.splitlines() if line and not line.startswith(" ")}
    kept = "".join(line + "\n" for line in base.splitlines() if line.split(":")[0] not in keys)
    write(d / "bad.yaml", kept + extra)   # the extra lines replace the base's keys of the same name
    write(d / "good.yaml", base.replace("task: bad", "task: good"))
    found = load_task_dir(d)
    assert "good" in found.configs          # one refused file does not stop the others
    with pytest.raises(LmstackError) as e:
        resolve_tasks("bad", str(d))
    assert str(d / "bad.yaml") in str(e.value) and message in str(e.value)


def test_groups_and_broken_files(tmp_path):
    d = tmp_path / "t"
    write(d / "g.yaml", "group: my_group\ntask: [a, b]\naggregate_metric_list: [{metric: acc}]\n")
    with pytest.raises(LmstackError, match=r"g\.yaml: key 'task': a list of tasks is a group"):
        resolve_tasks("my_group", str(d))
    write(d / "broken.yaml", "task: [unclosed\n")
    with pytest.raises(LmstackError, match=r"broken\.yaml: not valid YAML"):
        load_task_dir(d)
    with pytest.raises(LmstackError, match="is not a directory"):
        load_task_dir(tmp_path / "nope")


def test_cli_include_path(tiny_model_dir, task_dir, tmp_path, capsys):
    from lmstack.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "list", "--include_path", str(task_dir)]) == 0
    assert "my_mc" in capsys.readouterr().out.split()
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(tiny_model_dir), "--tasks", "my_mc", "--include_path", str(task_dir),
               "--limit", "3", "--out", str(out), "--progress", "false", "--bootstrap_iters", "0"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]["my_mc"]
    assert res["n"] == 3 and {"acc", "acc_norm", "exact_match"} <= set(res["metrics"])


def test_f1_and_mcc_equal_sklearn(task_dir, fake_lm_factory):
    sklearn = pytest.importorskip("sklearn.metrics")
    import random

    from lmstack.eval.tasks.yaml_task import binary_f1, matthews_corrcoef

    rng = random.Random(0)
    for k in (2, 2, 3, 4):
        items = [(rng.randrange(k), rng.randrange(k)) for _ in range(40)]
        golds, preds = zip(*items)
        if k == 2:
            assert binary_f1(items) == pytest.approx(sklearn.f1_score(golds, preds))
        assert matthews_corrcoef(items) == pytest.approx(sklearn.matthews_corrcoef(golds, preds))
    assert matthews_corrcoef([(1, 1), (1, 1)]) == 0.0          # undefined -> 0, as sklearn
    text = (task_dir / "mc.yaml").read_text().replace("task: my_mc", "task: mc_f1")
    write(task_dir / "mc_f1.yaml", text + "metric_list:\n  - metric: f1\n  - metric: mcc\n")
    [task] = resolve_tasks("mc_f1", str(task_dir))
    # items 0-3 predict their gold; items 4, 5 predict choice 0 (ties go to the first)
    right = {(f"Arithmetic.\n\nQ: What is {i}+1?\nA:", " " + MC_ROWS[i]["options"][MC_ROWS[i]["label"]]): 0.0
             for i in range(4)}
    lm = fake_lm_factory(loglikelihood=right)
    out = evaluate(lm, [task], bootstrap_iters=0, progress=False)["results"]["mc_f1"]["metrics"]
    golds, preds = [0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 0]
    assert out["f1"] == pytest.approx(sklearn.f1_score(golds, preds)) == pytest.approx(0.8)
    assert out["mcc"] == pytest.approx(sklearn.matthews_corrcoef(golds, preds))
