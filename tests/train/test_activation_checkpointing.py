"""Activation checkpointing has one switch, distributed.activation_checkpointing, read in one place
(distributed.place_model), in one process as in many."""
import dataclasses

import pytest
import torch

from lmstack.cli import main
from lmstack.config import ConfigError, from_dict
from lmstack.model import Transformer, preset
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import DistributedConfig, place_model

TEXT = "To be, or not to be, that is the question.\n" * 80


def test_place_model_switches_checkpointing_only_when_asked():
    cfg = preset("llama-small").replace(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, vocab_size=64)
    plain = place_model(Transformer(cfg), DistributedConfig(), torch.device("cpu"))
    assert plain.checkpoint_blocks is False
    model = Transformer(cfg)
    assert place_model(model, DistributedConfig(activation_checkpointing=True), torch.device("cpu")) is model
    assert model.checkpoint_blocks is True
    # a module without the switch is moved and otherwise left alone
    lin = place_model(torch.nn.Linear(2, 2), DistributedConfig(activation_checkpointing=True), torch.device("cpu"))
    assert not hasattr(lin, "checkpoint_blocks")


def test_train_config_has_no_second_switch():
    assert "activation_checkpointing" not in {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        from_dict(TrainConfig, {"activation_checkpointing": True})


def test_single_process_pretrain_recomputes_blocks(tmp_path, monkeypatch, capsys):
    """`--distributed.activation_checkpointing true` reaches the model in a plain one-process pretrain."""
    from lmstack.model import transformer as T

    seen = []
    forward = T.Transformer.forward

    def spy(self, *args, **kwargs):
        seen.append(self.checkpoint_blocks and self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(T.Transformer, "forward", spy)
    (tmp_path / "input.txt").write_text(TEXT)
    args = ["pretrain", "--out", str(tmp_path / "run"), "--data.text", str(tmp_path / "input.txt"),
            "--data.tokenizer", "char", "--data.seq_len", "32", "--data.batch_size", "2",
            "--model.vocab_size", "64", "--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2",
            "--model.max_seq_len", "32", "--train.steps", "2", "--train.eval_every", "0", "--train.progress",
            "false", "--distributed.activation_checkpointing", "true"]
    assert main(args) == 0, capsys.readouterr().err
    assert seen and any(seen)
