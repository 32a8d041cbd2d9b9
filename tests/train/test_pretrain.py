import json
from pathlib import Path

import pytest

from lmstack.cli import main

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 60)


def test_pretrain_cli_trains_saves_and_resumes(tmp_path, capsys):
    (tmp_path / "input.txt").write_text(TEXT)
    args = ["pretrain", "--config", "recipes/shakespeare_char.yaml", "--out", str(tmp_path / "run"),
            "--data.text", str(tmp_path / "input.txt"), "--model.vocab_size", "64", "--train.steps", "30",
            "--train.eval_every", "0", "--train.progress", "false", "--train.log_every", "5", "--train.save_every", "15"]
    root = Path(__file__).resolve().parents[2]
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "'steps': 30" in out and "val_loss" in out
        rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert losses[-1] < losses[0]
        assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "loss.png").exists()
        ckpt = tmp_path / "run" / "checkpoints" / "step_00000030" / "model"
        assert (ckpt / "tokenizer.json").exists() and (ckpt / "config.json").exists()
        # a longer run in the same directory resumes from step 30 instead of starting over
        assert main(args[:-4] + ["--train.steps", "35", "--train.save_every", "0"]) == 0
        assert "resumed from" in capsys.readouterr().out
        # resuming with a different model is refused, naming the field
        assert main(args[:-4] + ["--train.steps", "40", "--model.n_layers", "2"]) == 2
        assert "n_layers: checkpoint has 4, config has 2" in capsys.readouterr().err
    finally:
        os.chdir(cwd)


def test_pretrain_bad_input_is_named(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("abc")
    base = ["pretrain", "--out", str(tmp_path / "r"), "--data.tokenizer", "char", "--train.progress", "false"]
    assert main(base + ["--data.text", str(tmp_path / "tiny.txt")]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert main(base + ["--data.text", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--model.d_modle", "8"])
    assert "d_modle" in capsys.readouterr().err
