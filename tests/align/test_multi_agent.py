"""Multi-agent self-play: the asker is a second learning agent with its own weights and its own payoff."""
import math

import torch

from lmstack.align.config import AlignConfig
from lmstack.align.self_play import Dialogue, MultiAgentTrainer, asker_batch, asker_rewards, faithful, play


def test_faithful_compares_the_numbers_as_a_multiset():
    rec = {"prompt": "Ada has 13 coins and spends 9. How many are left?", "answer": 4}
    assert faithful("How many coins left if Ada has 13 and spends 9?", rec) == 1.0
    assert faithful("Ada has 13 coins, spends 9: is it 4?", rec) == 0.0  # leaks the answer
    assert faithful("Ada has 13 coins. How many left?", rec) == 0.0  # drops a number
    assert faithful("Ada has 31 coins and spends 9.", rec) == 0.0


def test_asker_reward_is_solved_and_faithful():
    rec = {"prompt": "What is 2 + 3?", "answer": 5}
    good = Dialogue(rec, questions=["What is 2 + 3?"], replies=["#### 5"], rewards=[1.0], solved=True)
    unfaithful = Dialogue(rec, questions=["What is 5?"], replies=["#### 5"], rewards=[1.0], solved=True)
    unsolved = Dialogue(rec, questions=["What is 2 + 3?"], replies=["#### 6"], rewards=[0.0])
    empty = Dialogue(rec)
    r = asker_rewards([good, unfaithful, unsolved, empty])
    assert r[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(float(r[3]))


def test_both_agents_learn_with_separate_weights(policy, tok):
    records = [{"prompt": "Tell me about the sea.", "answer": "sea"}, {"prompt": "Say something nice.", "answer": "x"}]
    cfg = AlignConfig(method="grpo", group_size=6, prompts_per_step=2, max_tokens=8, eval_prompts=2, temperature=1.5,
                      train={"steps": 1, "progress": False, "device": "cpu"}, optim={"lr": 1e-2},
                      schedule={"warmup_steps": 0})
    cfg.max_turns = 1
    reward = lambda p, c, r: float(c.count("e") >= 1)  # noqa: E731  (fires on some samples, not all)
    trainer = MultiAgentTrainer(policy, tok, cfg, reward, log=lambda m: None)
    assert trainer.asker_model is not trainer.policy
    ans0 = [p.detach().clone() for p in trainer.policy.parameters()]
    ask0 = [p.detach().clone() for p in trainer.asker_model.parameters()]
    summary = trainer.fit(records, records)
    row = summary["history"][0]
    assert {"answerer_reward", "asker_reward", "answerer_informative_fraction",
            "asker_informative_fraction"} <= set(row)
    assert row["asker_informative_fraction"] > 0 and row["answerer_informative_fraction"] > 0, row
    assert any(not torch.equal(a, p) for a, p in zip(ans0, trainer.policy.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(ask0, trainer.asker_model.parameters()))
    # the two agents moved differently: they are two models, not one in two roles
    assert any(not torch.equal(a, b) for a, b in zip(trainer.policy.parameters(), trainer.asker_model.parameters()))
    after = summary["eval_after"]
    assert {"mean", "stderr", "n", "asker_mean", "asker_stderr", "faithful"} <= set(after)


def test_asker_batch_marks_only_the_sampled_question(policy, tok):
    records = [{"prompt": "What is 2 + 3?", "answer": 5}]
    ds = play(policy, tok, records, lambda p, c, r: 0.0, n=2, max_turns=1, max_new_tokens=4, temperature=1.0,
              asker="policy")
    batch = asker_batch(ds, tok.pad_id, "cpu")
    for i, d in enumerate(ds):
        n_ctx = d.asker_mask.index(1) if 1 in d.asker_mask else len(d.asker_mask)
        assert int(batch["completion_mask"][i].sum()) == len(d.asker_ids) - n_ctx
        assert batch["input_ids"][i, :len(d.asker_ids)].tolist() == d.asker_ids
