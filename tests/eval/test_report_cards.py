"""`lmstack report DIR` on any stage's run directory (pretrain, finetune, align, a speedrun): its curves, a caption
under every figure, metrics of different scales on separate panels, the two bits-per-byte numbers explained,
and a regression table that flags a metric dropping beyond its stderr from one stage to the next."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.eval.plots import metric_panels
from lmstack.eval.report import build_report
from lmstack.eval.report.stage_regressions import regressions, stage_measurements

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 40)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _captioned(text: str) -> list[str]:
    """Every figure's image line; fails unless the next non-empty line is its caption."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    images = [i for i, ln in enumerate(lines) if ln.startswith("![")]
    for i in images:
        assert lines[i + 1].startswith("_Figure:"), f"no caption under {lines[i]}"
    return [lines[i] for i in images]


def _sft_rows():
    return [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-4 * s / 4, "grad_norm": 2.0, "tokens_per_s": 900.0 + s,
             "mfu": 0.1} for s in range(1, 5)] + [{"step": 4, "val_loss": 2.9, "val_token_acc": 0.3}]


def _dpo_rows():
    return [{"step": s, "loss": 0.69 - s / 50, "accuracy": 0.5 + s / 20, "lr": 2e-4, "grad_norm": 1.5,
             "chosen_reward": 0.01 * s, "rejected_reward": -0.01 * s, "margin": 0.02 * s} for s in range(1, 4)] \
        + [{"step": 3, "val_accuracy": 0.6, "val_margin": 0.05}]


def _grpo_rows():
    return [{"step": s, "loss": -0.01 * s, "reward_mean": 0.1 * s, "kl": 0.001 * s, "lr": 1e-4,
             "grad_norm": 0.5, "seconds": 1.0} for s in range(1, 4)]


def test_report_on_a_real_pretrain_run_directory(tmp_path, monkeypatch):
    (tmp_path / "input.txt").write_text(TEXT)
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "recipes/shakespeare_char.yaml", "--out", str(run), "--data.text",
                 str(tmp_path / "input.txt"), "--model.vocab_size", "64", "--model.n_layers", "1", "--model.d_model",
                 "32", "--model.n_heads", "2", "--model.n_kv_heads", "1", "--train.steps", "4", "--train.eval_every",
                 "0", "--train.eval_batches", "1", "--train.progress", "false", "--train.log_every", "2"]) == 0
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "No training metrics" not in text
    assert re.search(r"\| run \| pretraining \| 4 \| \d", text), text
    images = _captioned(text)
    assert "![loss curve: run](plots/loss_run.png)" in images and "![metrics: run](plots/curves_run.png)" in images
    assert (run / "plots" / "loss_run.png").is_file() and (run / "plots" / "curves_run.png").is_file()
    assert "y: loss (nats/token)" in text


@pytest.mark.parametrize("kind,rows,config,label,unit", [
    ("finetune", _sft_rows, {"method": "lora", "adapter": {"method": "lora"}}, "supervised fine-tuning (lora)",
     "nats per assistant token"),
    ("align", _dpo_rows, {"method": "dpo", "beta": 0.1}, "preference optimisation (dpo)", "nats per pair"),
    ("align", _grpo_rows, {"method": "grpo", "beta": 0.1}, "online RL (grpo)", "policy surrogate loss"),
])
def test_report_on_finetune_and_align_run_directories(tmp_path, kind, rows, config, label, unit):
    run = tmp_path / kind
    _jsonl(run / "metrics.jsonl", rows())
    (run / "config.yaml").write_text(json.dumps(config))
    text = build_report(run).read_text()
    assert f"| {kind} | {label} |" in text and unit in text
    assert len(_captioned(text)) == 2 and (run / "plots" / f"curves_{kind}.png").is_file()


def test_speedrun_layout_shows_sft_dpo_and_grpo_curves(tmp_path):
    run = tmp_path / "speed"
    _jsonl(run / "pretrain" / "metrics.jsonl", [{"step": 1, "loss": 5.0, "lr": 1e-3, "time": 900.0},
                                                {"step": 2, "loss": 4.0, "lr": 1e-3, "time": 901.0}])
    for i, (folder, rows) in enumerate(((("sft", "run"), _sft_rows()), (("align", "dpo"), _dpo_rows()),
                                        (("align", "grpo"), _grpo_rows()))):
        _jsonl(run.joinpath(*folder, "metrics.jsonl"), [{**r, "time": 1000.0 + 10 * i + j} for j, r in enumerate(rows)])
    _jsonl(run / "pretrain" / "checkpoints" / "step_1" / "metrics.jsonl", [{"step": 1, "loss": 9.0}])  # not a stage
    text = build_report(run).read_text()
    for stage, label in (("pretrain", "pretraining"), ("sft/run", "supervised fine-tuning"),
                         ("align/dpo", "preference optimisation (dpo)"), ("align/grpo", "online RL (grpo)")):
        assert f"| {stage} | {label}" in text, stage
        slug = stage.replace("/", "_")
        assert f"![metrics: {stage}](plots/curves_{slug}.png)" in text and (run / "plots" / f"curves_{slug}.png").is_file()
    table = text.split("## Training")[1].split("## Evaluation")[0]
    assert "checkpoints" not in table
    # in the order the stages ran (the first row's time), not path order (align/ sorts before sft/)
    assert (table.index("| pretrain |") < table.index("| sft/run |") < table.index("| align/dpo |")
            < table.index("| align/grpo |"))
    assert len(_captioned(text)) == 8


def test_metrics_of_different_scales_get_separate_panels():
    panels, left_out = metric_panels(_sft_rows() + [{"step": 5, "val_lr": 1e-4}])
    assert panels[:4] == [["lr", "val_lr"], ["grad_norm"], ["tokens_per_s"], ["mfu"]]  # lr 1e-4 apart from 1e3
    assert ["val_token_acc"] in panels and not left_out
    assert all("loss" not in p for p in panels)  # the loss has its own figure
    dpo, _ = metric_panels(_dpo_rows() + [{"step": 3, "val_n_pairs": 8}])
    assert dpo[:2] == [["accuracy", "val_accuracy"], ["margin", "val_margin"]]  # what DPO optimises comes first
    assert not any("val_n_pairs" in p for p in dpo)  # a count, not a curve
    many = [{"step": 1, **{f"m{i}": float(i) for i in range(15)}}]
    panels, left_out = metric_panels(many)
    assert len(panels) == 12 and len(left_out) == 3


def _eval(path: Path, metrics: dict, when: float, higher: dict | None = None):
    res = {"world_qa": {"metrics": metrics, "n": 100, "chance": None}}
    if higher:
        res["world_qa"]["higher_is_better"] = higher
    path.write_text(json.dumps({"results": res, "config": {}}))
    os.utime(path, (when, when))


def test_regression_table_flags_drops_beyond_stderr_only(tmp_path):
    run = tmp_path / "two"
    run.mkdir()
    now = time.time()
    _eval(run / "eval_base.json", {"exact_match": 0.50, "exact_match_stderr": 0.03,      # drops 0.20: beyond
                                   "contains_fact": 0.40, "contains_fact_stderr": 0.05,  # drops 0.02: within
                                   "bits_per_byte": 2.0, "bits_per_byte_stderr": 0.01},  # rises 0.5: worse
          now, higher={"bits_per_byte": False})
    _eval(run / "eval_sft.json", {"exact_match": 0.30, "exact_match_stderr": 0.03,
                                  "contains_fact": 0.38, "contains_fact_stderr": 0.05,
                                  "bits_per_byte": 2.5, "bits_per_byte_stderr": 0.01}, now + 5)
    (run / "align").mkdir()
    (run / "align" / "scores.json").write_text(json.dumps({"scores": {
        "sft": {"harmful_refusal_rate": 0.9, "harmful_refusal_rate_stderr": 0.03, "n_harmful": 100},
        "aligned": {"harmful_refusal_rate": 0.1, "harmful_refusal_rate_stderr": 0.03, "n_harmful": 100}}}))
    rows = {r["metric"]: r for r in regressions(stage_measurements(run, {
        "base": json.loads((run / "eval_base.json").read_text())["results"],
        "sft": json.loads((run / "eval_sft.json").read_text())["results"]}))}
    assert rows["world_qa exact_match"]["flagged"] and not rows["world_qa contains_fact"]["flagged"]
    assert rows["world_qa bits_per_byte"]["flagged"]  # lower is better: a rise is the regression
    assert rows["harmful_refusal_rate (align/scores.json)"]["flagged"]  # the safety collapse after alignment
    assert rows["world_qa exact_match"]["se_diff"] == pytest.approx((0.03 ** 2 * 2) ** 0.5)
    text = build_report(run).read_text()
    assert "3 of 4 flagged" in text
    assert ("| world_qa exact_match | base → sft | 0.5000 ± 0.0300 | 0.3000 ± 0.0300 | -0.2 | "
            "**⚠ worse beyond stderr** |") in text
    assert "| world_qa contains_fact | base → sft | 0.4000 ± 0.0500 | 0.3800 ± 0.0500 | -0.02 | worse, within stderr |" \
        in text
    assert "| harmful_refusal_rate (align/scores.json) | sft (align stage) → aligned (align stage) |" in text


def test_both_bits_per_byte_numbers_are_explained(tmp_path):
    run = tmp_path / "bpb"
    _jsonl(run / "pretrain" / "metrics.jsonl", [{"step": 2, "loss": 3.0}, {"step": 2, "val_loss": 3.1, "val_bpb": 3.7}])
    (run / "summary.json").write_text(json.dumps({"pretrain": {"val_loss": 3.1, "val_bpb": 3.7, "parameters": 10}}))
    _eval(run / "eval_base.json", {"bits_per_byte": 3.5, "bits_per_byte_stderr": 0.01}, time.time())
    text = build_report(run).read_text()
    note = text.split("| validation bits per byte | 3.7000 |")[1].split("| stage |")[0]
    assert "world_val_bpb bits_per_byte" in note and "not the evaluation's" in note and "rolling" in note
    assert "| world_qa bits_per_byte | 100 | 3.5000 ± 0.0100 |" in text
