"""The report card: renders every stage a run directory holds, and leaves out (with a note) what it lacks."""
import json
import os
import time

import pytest

from lmstack.cli import run as cli_run
from lmstack.errors import LmstackError
from lmstack.eval.report import build_report


def _eval_file(path, acc, skipped=False):
    results = {"arc_easy": {"metrics": {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc + 0.01,
                                        "acc_norm_stderr": 0.02, "ece": 0.1},
                            "n": 200, "chance": 0.25,
                            "perf": {"tokens_per_s": 900.0, "ttft_s": None, "peak_mem_mb": 310.0,
                                     "flops_per_query": 1.5e9, "energy_j": 0.15, "cpu_s": 2.0}},
               "world_qa": {"metrics": {"exact_match": acc / 2, "exact_match_stderr": 0.03}, "n": 50, "chance": None}}
    if skipped:
        results["mmlu"] = {"skipped": "task 'mmlu': data file /x/mmlu.csv is missing"}
    path.write_text(json.dumps({"results": results, "config": {}}))


def _make_run(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "report.json").write_text(json.dumps({
        "steps": [{"name": "read", "seen": 100, "kept": 100, "dropped": {}, "seconds": 0.1},
                  {"name": "quality", "seen": 100, "kept": 80, "dropped": {"short": 15, "symbols": 5}, "seconds": 0.2}],
        "shards": {"docs": 80, "tokens": 12345, "dtype": "uint16", "shards": 1}}))
    (run / "data" / "clean.jsonl").write_text("".join(json.dumps({"text": f"hello world number {i}"}) + "\n"
                                                      for i in range(20)))
    from lmstack.tokenizer import train_tokenizer

    tok = train_tokenizer(texts=[f"hello world number {i}" for i in range(200)], type="bpe", vocab_size=300,
                          show_progress=False)
    tok.save(run / "tokenizer")
    (run / "pretrain").mkdir()
    rows = [{"step": s, "loss": 5.0 - s / 10, "tokens_per_s": 1000.0, "mfu": 0.1} for s in range(0, 30, 10)]
    rows.append({"step": 30, "val_loss": 2.5, "val_bpb": 1.2})
    (run / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    (run / "summary.json").write_text(json.dumps({
        "total_seconds": 120, "timings": {"world": 1.0, "pretrain": 100.0},
        "pretrain": {"parameters": 123456, "tokens_seen": 5000, "steps": 30, "train_seconds": 100,
                     "val_loss": 2.5, "val_ppl": 12.18, "val_bpb": 1.2},
        "samples": [{"prompt": "Once upon a time", "text": " there was a cat"}]}))
    _eval_file(run / "eval_base.json", 0.30, skipped=True)
    later = time.time() + 5
    _eval_file(run / "eval_sft.json", 0.40)
    os.utime(run / "eval_sft.json", (later, later))  # stages are ordered by when they ran
    (run / "eval_sft").mkdir()
    (run / "eval_sft" / "samples_arc_easy.jsonl").write_text(json.dumps(
        {"doc_id": 0, "prompt": "Question: Why?\nAnswer:", "responses": [[-1.0, False]]}) + "\n")
    return run


def test_report_renders_every_stage(tmp_path):
    run = _make_run(tmp_path)
    text = build_report(run).read_text()
    assert "| quality | 100 | 80 | 80.0 | short: 15, symbols: 5 |" in text
    assert "12,345 tokens" in text and "| type | bpe |" in text and "bytes per token" in text
    assert "| parameters | 123,456 |" in text and "final validation loss" in text
    assert "![loss curve: pretrain](plots/loss_pretrain.png)" in text and (run / "plots" / "loss_pretrain.png").is_file()
    # One eval table, base then sft, with stderr and a chance column for the MC scores only.
    assert "| task / metric | n | base | sft | chance |" in text
    assert "| arc_easy acc | 200 | 0.3000 ± 0.0200 | 0.4000 ± 0.0200 | 0.250 |" in text
    assert "| world_qa exact_match | 50 | 0.1500 ± 0.0300 | 0.2000 ± 0.0300 | — |" in text
    assert "| arc_easy ece |" in text and "mmlu: skipped" in text
    assert (run / "plots" / "eval.png").is_file()
    assert "| arc_easy | 900 | — | 310 | 1.5e+09 | 0.15 | 2.0 |" in text
    assert "**Once upon a time** there was a cat" in text and "eval_sft/arc_easy" in text


def test_empty_run_dir_gets_notes_not_a_crash(tmp_path):
    (tmp_path / "r").mkdir()
    text = build_report(tmp_path / "r").read_text()
    for note in ("No data pipeline report", "No tokenizer", "No training metrics", "No evaluation results"):
        assert note in text
    with pytest.raises(LmstackError, match="does not exist"):
        build_report(tmp_path / "missing")


def test_cli_report_command(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    cli_run(["report", str(tmp_path / "r")])
    assert "report.md" in capsys.readouterr().out and (tmp_path / "r" / "report.md").is_file()
