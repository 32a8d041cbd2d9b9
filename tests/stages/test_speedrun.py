"""`lmstack speedrun`: end to end at a tiny budget (slow), and its closing lines, which point at the model to chat
with: aligned, else SFT, never the base model."""
from pathlib import Path

import pytest

from lmstack.stages.speedrun import closing_lines


def test_closing_lines_point_at_the_aligned_chat_model_and_name_the_sft_one():
    text = closing_lines({"base": "run/pretrain/checkpoints/step_00000280/model", "sft": "run/sft/run/model",
                          "aligned": "run/align/model"})
    first = text.splitlines()[0]
    assert first == "chat with the aligned model: lmstack chat --model run/align/model"
    assert "SFT model it was aligned from: run/sft/run/model" in text
    assert "chat --model run/pretrain" not in text  # the base model is named, but not offered for chat


def test_closing_lines_without_alignment_or_sft():
    assert closing_lines({"base": "b", "sft": "s"}).splitlines()[0] == "chat with the SFT model: lmstack chat --model s"
    only_base = closing_lines({"base": "b"})
    assert "lmstack chat" not in only_base and "lmstack generate --model b" in only_base


@pytest.mark.slow
def test_speedrun_end_to_end_with_a_tiny_budget(tmp_path):
    from lmstack.config import from_dict
    from lmstack.stages.speedrun import SpeedrunConfig, speedrun

    cfg = SpeedrunConfig(out=str(tmp_path), vocab_size=512)
    cfg.pretrain.model = cfg.pretrain.model.replace(vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                                    max_seq_len=64)
    cfg.pretrain.train.max_seconds, cfg.pretrain.train.eval_every = 10, 0
    cfg.pretrain.data.seq_len, cfg.pretrain.data.batch_size = 64, 8
    cfg.eval_seconds, cfg.eval_limit, cfg.sft_seconds = 20, 5, 10
    out = speedrun(cfg)
    report = Path(out["report"]).read_text()
    assert "## SFT (full" in report and "SFT, chat template" in report
    assert "final validation loss" in report and "parameters" in report and "loss curve" in report
    assert len(out["samples"]) == 4
    assert from_dict(SpeedrunConfig, {"seed": 1}).seed == 1
