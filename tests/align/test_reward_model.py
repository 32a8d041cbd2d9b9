"""Reward model: the scalar head reads the last real token, Bradley-Terry training raises pairwise accuracy,
per-row margins are used, and save/load round-trips exactly."""
import pytest
import torch
from align_helpers import make_policy

from lmstack.align.config import AlignConfig
from lmstack.align.logprobs import collate, encode_pair
from lmstack.align.preference_data import Pair, pairs_from_records
from lmstack.align.reward_model import (RewardModel, RewardModelScorer, _rm_loss, load_reward_model,
                                        pairwise_accuracy, train_reward_model)
from lmstack.errors import LmstackError


def test_reward_is_read_at_the_last_real_token(tok):
    rm = RewardModel(make_policy(tok)).eval()
    rows = [encode_pair(tok, "Hi", "Hello there, friend."), encode_pair(tok, "Hi", "Yo")]
    batch = collate(rows, tok.pad_id)
    with torch.no_grad():
        both = rm(batch["input_ids"], batch["attention_mask"])
        alone = rm(**{k: v for k, v in collate(rows[1:], tok.pad_id).items()
                      if k in ("input_ids", "attention_mask")})
        # the same value as the head applied to the hidden state at the <|assistant_end|> position by hand
        hidden = rm.backbone(batch["input_ids"], return_hidden=True)
        n = int(batch["attention_mask"][1].sum())
        by_hand = rm.score(hidden[1, n - 1]).squeeze()
    assert float(both[1]) == pytest.approx(float(alone[0]), abs=1e-5)
    assert float(both[1]) == pytest.approx(float(by_hand), abs=1e-6)


def test_training_raises_pairwise_accuracy(tok, world):
    recs = [r for r in world.corpus("preferences", split="train") if r["kind"] in ("helpfulness", "harmful", "benign")]
    pairs = pairs_from_records(recs[:24]).pairs
    rm = RewardModel(make_policy(tok))
    cfg = AlignConfig(method="rm", batch_size=8, max_len=128,
                      train={"steps": 20, "progress": False, "eval_every": 0, "log_every": 5}, optim={"lr": 3e-3},
                      schedule={"warmup_steps": 0})
    summary = train_reward_model(rm, tok, pairs, pairs, cfg, log=lambda s: None)
    assert summary["val_after"]["accuracy"] >= 0.9 > summary["val_before"]["accuracy"]
    assert summary["val_after"]["margin"] > summary["val_before"]["margin"]
    assert "accuracy/harmful" in summary["val_after"]
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]


def test_row_margin_overrides_config_margin(tok):
    rm = RewardModel(make_policy(tok))
    pairs = [Pair("Hi", "Hello!", "No.", meta={"margin": 2.0}), Pair("Yo", "Hey there.", "Bye.")]
    cfg = AlignConfig(method="rm", margin=0.5)
    out = _rm_loss(rm, tok, pairs, cfg, "cpu", {})
    d = out["margins"]  # r_c - r_r without the margin
    expect = -torch.nn.functional.logsigmoid(d - torch.tensor([2.0, 0.5])).mean()
    assert float(out["loss"].detach()) == pytest.approx(float(expect), abs=1e-6)


def test_save_load_round_trip_and_scorer(tok, tmp_path):
    rm = RewardModel(make_policy(tok), seed=3).eval()
    with torch.no_grad():
        rm.score.bias.fill_(0.25)
    pairs = [Pair("Hi", "Hello!", "No."), Pair("Tell me about X.", "X is a city.", "Go away.")]
    before = pairwise_accuracy(rm, tok, pairs)
    rm.save(tmp_path / "rm", tok)
    loaded, tok2 = load_reward_model(tmp_path / "rm")
    a = rm.rewards(tok, ["Hi"], ["Hello!"])
    b = loaded.rewards(tok2, ["Hi"], ["Hello!"])
    assert torch.allclose(a, b, atol=1e-6)
    assert pairwise_accuracy(loaded, tok2, pairs) == before
    assert RewardModelScorer(loaded, tok2)("Hi", "Hello!") == pytest.approx(float(a[0]), abs=1e-6)
    with pytest.raises(LmstackError, match="not a reward model"):
        load_reward_model(tmp_path)
