"""`--tasks name:key=value,...`: the grammar, type conversion, clear errors, and the CLI end to end."""
import json

import pytest

from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.eval.task_args import build_task, parse_task_specs, resolve_tasks


def test_grammar_names_arguments_and_quotes():
    assert parse_task_specs("arc_easy,hellaswag") == [("arc_easy", {}), ("hellaswag", {})]
    assert parse_task_specs("multiple_choice:path=my.jsonl,lambada:path=lam.jsonl") == [
        ("multiple_choice", {"path": "my.jsonl"}), ("lambada", {"path": "lam.jsonl"})]
    # key=value after a task adds to it; a ':' inside a value (a Windows drive) stays in the value
    assert parse_task_specs(r"lambada:path=C:\data\lam.jsonl,eval_split=test,arc_easy") == [
        ("lambada", {"path": r"C:\data\lam.jsonl", "eval_split": "test"}), ("arc_easy", {})]
    # quotes protect commas; repeated flags (a list) concatenate
    assert parse_task_specs(['multiple_choice:path="a,b.jsonl"', "arc_easy"]) == [
        ("multiple_choice", {"path": "a,b.jsonl"}), ("arc_easy", {})]
    # 'single' quotes are literal, "double" quotes are JSON strings (escapes for delimiters)
    assert parse_task_specs(r"""t:fewshot_delimiter="\n##\n",path='C:\d,x'""") == [
        ("t", {"fewshot_delimiter": "\n##\n", "path": "C:\\d,x"})]


@pytest.mark.parametrize("spec, message", [
    ("path=x.jsonl", "no task name comes before it"),
    ('multiple_choice:path="x.jsonl', "never closed"),
    ("multiple_choice:path=a,path=b", "given 'path' twice"),
    ("multiple_choice:not a key", "is not key=value"),
    (r'multiple_choice:path="C:\data"', "not a valid double-quoted string"),
])
def test_grammar_errors(spec, message):
    with pytest.raises(LmstackError, match=message):
        parse_task_specs(spec)


def test_arguments_reach_the_task_with_their_types():
    task = build_task("multiple_choice", {"path": "my.jsonl", "target_delimiter": "\t"})
    assert task.path == "my.jsonl" and task.target_delimiter == "\t" and task.name == "multiple_choice"
    with pytest.raises(LmstackError, match=r"task 'lambada' takes no argument 'foo'; its arguments: .*path"):
        build_task("lambada", {"foo": "1"})
    with pytest.raises(LmstackError, match="unknown task 'nope'"):
        resolve_tasks("nope:path=x")


def test_cli_multiple_choice_with_a_path(tiny_model_dir, tmp_path, capsys):
    rows = [{"query": f"Q{i}: pick one", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(5)]
    data = tmp_path / "my,mc.jsonl"   # a comma in the path: quoted
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(tiny_model_dir), "--tasks", f'multiple_choice:path="{data}"',
               "--out", str(out), "--progress", "false", "--bootstrap_iters", "0"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]["multiple_choice"]
    assert res["n"] == 5 and 0.0 <= res["metrics"]["acc"] <= 1.0
    samples = [json.loads(x) for x in (out / "samples_multiple_choice.jsonl").read_text().splitlines()]
    assert samples[1]["prompt"] == "Q1: pick one" and samples[1]["requests"][2]["continuation"] == " maybe"

    main(["eval", "--model", str(tiny_model_dir), "--tasks", f"lambada:path={tmp_path / 'none.jsonl'}",
          "--progress", "false"])
    printed = capsys.readouterr().out
    assert "skipping lambada" in printed and "none.jsonl is missing" in printed and "LMSTACK_DATA" not in printed

    rc = main(["eval", "--model", str(tiny_model_dir), "--tasks", "multiple_choice:paht=x.jsonl"])
    err = capsys.readouterr().err
    assert rc != 0 and "takes no argument 'paht'" in err and "Traceback" not in err
