"""Self-play dialogue: turn alternation, length limits, reward on the answerer's turns only, one training step."""
import math

import pytest
import torch

from lmstack.align.config import AlignConfig
from lmstack.align.self_play import (FOLLOW_UP, SelfPlayTrainer, answer_in_reply, dialogue_batch, dialogue_stats,
                                     play)
from lmstack.align.rollout import prompt_text
from lmstack.errors import LmstackError




@pytest.fixture
def records():
    # Short questions: the tiny tokenizer spends many tokens on a world problem, and a follow-up repeats it.
    return [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a, b in ((2, 3), (4, 1), (6, 2), (5, 5))]


def test_turns_alternate_and_stop_at_max_turns(policy, tok, records):
    never = lambda p, c, r: 0.0  # noqa: E731
    ds = play(policy, tok, records[:2], never, n=2, max_turns=3, max_new_tokens=6, temperature=1.0, seed=0)
    assert len(ds) == 4 and all(d.turns == 3 and d.stop == "max_turns" and not d.solved for d in ds)
    d = ds[0]
    assert d.questions[0] == prompt_text(records[0])
    assert d.questions[1] == FOLLOW_UP.format(question=d.questions[0])
    roles = [m["role"] for m in d.messages()]
    assert roles == ["user", "assistant"] * 3
    # The ids are the chat template's multi-turn layout: user and assistant turns strictly alternate.
    us, ue, as_, ae = (tok.special_id(n) for n in ("user_start", "user_end", "assistant_start", "assistant_end"))
    opens = [t for t in d.ids if t in (us, as_)]
    assert opens == [us, as_] * 3 and d.ids.count(ae) == 3 and d.ids.count(ue) == 3
    # Only answerer tokens are marked (and rewarded): none of the user turn's tokens.
    assert len(d.mask) == len(d.ids) and sum(d.mask) == d.answer_tokens <= 3 * 6
    for i, (t, m) in enumerate(zip(d.ids, d.mask)):
        if t in (us, ue, as_):
            assert m == 0


def test_solved_dialogue_ends_and_reward_is_answerers(policy, tok, records):
    seen = []

    def judge(prompt, completion, record):
        seen.append(prompt)
        return 1.0 if len(seen) > 1 else 0.0  # first reply wrong, every later one right

    ds = play(policy, tok, records[:1], judge, n=1, max_turns=4, max_new_tokens=5, temperature=0.0)
    d = ds[0]
    assert d.solved and d.turns == 2 and d.stop == "solved" and d.rewards == [0.0, 1.0] and d.reward == 1.0
    assert seen[1] == d.questions[1]  # the verifier saw the asker's question and scored the answerer's reply
    stats = dialogue_stats(ds)
    assert stats["mean"] == 1.0 and stats["first_turn_accuracy"] == 0.0 and stats["mean_turns"] == 2
    with pytest.raises(LmstackError, match="asker"):
        play(policy, tok, records[:1], judge, asker="oracle")


def test_context_limit_ends_dialogue(tok, records):
    from align_helpers import make_policy

    small = make_policy(tok)
    small.config.max_seq_len = 60  # the question, a follow-up and a few replies fill it
    ds = play(small, tok, records[:1], lambda p, c, r: 0.0, n=1, max_turns=10, max_new_tokens=30, temperature=0.0)
    assert ds[0].stop == "context" and len(ds[0].ids) <= 60 and ds[0].turns < 10


def test_answer_in_reply():
    assert answer_in_reply("", "She was born in  Fernspire.", {"answer": "fernspire"}) == 1.0
    assert answer_in_reply("", "Lyon", {"answer": "Fernspire"}) == 0.0
    assert math.isnan(answer_in_reply("", "x", {"answer": 3}))


def test_one_training_step_moves_weights_on_answerer_tokens(policy, tok, records):
    cfg = AlignConfig(method="grpo", group_size=4, prompts_per_step=2, max_tokens=8, eval_prompts=2,
                      train={"steps": 1, "progress": False, "device": "cpu"}, optim={"lr": 1e-3},
                      schedule={"warmup_steps": 0})
    cfg.max_turns = 2
    letter_e = lambda p, c, r: float(c.count("e") >= 2)  # noqa: E731
    before = [p.detach().clone() for p in policy.parameters()]
    trainer = SelfPlayTrainer(policy, tok, cfg, letter_e, log=lambda m: None)
    summary = trainer.fit(records, records[:2])
    row = summary["history"][0]
    assert summary["method"] == "self_play" and "mean_turns" in summary["eval_before"]
    assert not row.get("skipped") and row["informative_fraction"] > 0  # seeded: some group is mixed
    assert math.isfinite(row["loss"]) and trainer.opt_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert 1 <= row["train_mean_turns"] <= 2


def test_dialogue_batch_masks_answerer_tokens(policy, tok, records):
    ds = play(policy, tok, records[:2], lambda p, c, r: 0.0, n=1, max_turns=2, max_new_tokens=4, temperature=0.0)
    b = dialogue_batch(ds, tok.pad_id, "cpu")
    assert b["completion_mask"].sum().item() == sum(d.answer_tokens for d in ds)
    assert b["attention_mask"].sum().item() == sum(len(d.ids) for d in ds)
