"""`lmstack eval` end to end on the tiny model: table, results.json, per-item logs, skipped tasks, bad input."""
import json

import pytest

from lmstack.cli import main

ARC_ROWS = [{"query": f"Question: What comes after {w}?", "choices": ["the cat", "a dog", "one two"], "gold": i % 3}
            for i, w in enumerate(["one", "two", "three", "four", "five", "six"])]


@pytest.fixture
def arc_data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "arc").mkdir(parents=True)
    (root / "arc" / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC_ROWS))
    monkeypatch.setenv("LMSTACK_DATA", str(root))
    return root


def test_eval_command_writes_results_and_samples(tiny_model_dir, arc_data, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy,hellaswag", "--limit", "4",
               "--num_fewshot", "1", "--out", str(out), "--progress", "false", "--bootstrap_iters", "20"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "acc_norm" in printed and "skipped" in printed   # hellaswag has no data here
    results = json.loads((out / "results.json").read_text())
    arc = results["results"]["arc_easy"]
    assert arc["n"] == 4 and arc["chance"] == pytest.approx(1 / 3) and 0 <= arc["metrics"]["acc"] <= 1
    assert "missing" in results["results"]["hellaswag"]["skipped"]
    samples = [json.loads(x) for x in (out / "samples_arc_easy.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0]["prompt"].count("Question:") == 2    # one shot + the question
    assert samples[0]["prompt"].endswith("Question: What comes after one?\nAnswer:")


def test_eval_command_bad_input(tiny_model_dir, capsys, tmp_path):
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy,not_a_task"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'not_a_task'" in err and "arc_easy" in err and "hellaswag" in err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--tasks", "arc_easy"]) == 2
    assert "no model directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "list"]) == 0
    assert "arc_easy" in capsys.readouterr().out.split()
