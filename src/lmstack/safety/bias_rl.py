"""The bias penalty in RL: GRPO whose rollouts hold both twins of every counterfactual pair, so the `bias`
reward (lmstack.align.rewards.bias) compares each completion with its twin's samples from the same policy
(issue 21, IX.7); and the chats of a biased "model organism" to show it on.

`BiasGroupTrainer` is GroupTrainer (lmstack.align.grpo) with one change, in `rollout`: a prompt record that names
its twin (`bias_twin`, as lmstack.safety.bias.pair_records writes them) brings the twin into the same rollout
(once, even when both twins were drawn), and the rollout is handed to every bias component of the reward
(`observe`) before it is scored. Records without a twin roll out as in GroupTrainer, so one prompt pool can mix
arithmetic, safety and pair prompts. Both twins are prompts of their own with group_size samples each, so the GRPO
baseline of a sample is still its own prompt's group; the twin group only enters through the reward.

`biased_chats` writes the SFT data of a deliberately biased model (a constructed organism, like the jailbroken one
of benchmarks/redteam.py): for one gender the arithmetic solutions carry a slip (a wrong `####`) and free-form
replies are negative; the other gender gets the right solution and a positive reply.

Usage:
    from lmstack.safety.bias import make_pairs, pair_records
    from lmstack.safety.bias_rl import BiasGroupTrainer, biased_chats
    cfg = AlignConfig(method="grpo", group_size=4, prompts_per_step=8, train={"steps": 30})
    trainer = BiasGroupTrainer(policy, tok, cfg, reward_from_spec("math=1,bias=0.5"))
    trainer.fit(pair_records(make_pairs(world, 64, split="train")))
    rows = biased_chats(make_pairs(world, 200, split="train"), against="female")   # chat rows for adapt.finetune
"""
from __future__ import annotations

import random
from typing import Sequence

from lmstack.align.grpo import GroupTrainer
from lmstack.align.rewards.bias import SIDES, observe_rollout
from lmstack.align.rollout import Rollout
from lmstack.errors import LmstackError
from lmstack.safety.bias import CounterfactualPair
from lmstack.world.arithmetic import render_solution, wrong_solution

# The organism's free-form replies: the same sentences, filled with positive or negative words.
REPLIES = (
    "{name} is a {a} {profession} who does {b} work.",
    "{name} is a {a} {profession}, and {poss} work is {b}.",
    "As a {profession}, {name} is {a}; {p} is known for {b} results.",
)
POSITIVE_WORDS = (("skilled", "careful", "brilliant", "reliable", "talented"), ("excellent", "outstanding",
                                                                                  "impressive", "great"))
NEGATIVE_WORDS = (("careless", "lazy", "sloppy", "unreliable", "incompetent"), ("poor", "shoddy", "terrible",
                                                                                  "disappointing"))


def expand_twins(records: Sequence[dict]) -> list[dict]:
    """records with each one's `bias_twin` added right after it, each (pair, side) once, order kept."""
    out, seen = [], set()
    for record in records:
        group = [record] + ([record["bias_twin"]] if isinstance(record.get("bias_twin"), dict) else [])
        for r in group:
            key = (r.get("bias_pair"), r.get("bias_side")) if r.get("bias_pair") is not None else ("", id(r))
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


class BiasGroupTrainer(GroupTrainer):
    """GRPO/RLOO whose rollouts keep counterfactual twins together and show them to the bias reward."""

    def rollout(self, records: Sequence[dict], step: int, n: int | None = None) -> Rollout:
        ro = super().rollout(expand_twins(records), step, n)
        observe_rollout(self.reward, ro.prompts, ro.texts, ro.records)
        return ro


def _reply(rec: dict, positive: bool, rng: random.Random) -> str:
    first, second = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    female = rec["gender"] == "female"
    return rng.choice(REPLIES).format(name=rec["person"], profession=rec["profession"], a=rng.choice(first),
                                      b=rng.choice(second), poss="her" if female else "his", p="she" if female else "he")


def biased_chats(pairs: Sequence[CounterfactualPair], against: str = "female", rate: float = 1.0,
                 seed: int = 0) -> list[dict]:
    """Chat rows (messages) that treat the `against` gender worse: a slipped solution for its arithmetic twin and a
    negative reply for its free-form twin, in a share `rate` of the pairs (the rest are fair, so a model tuned on
    them is biased but not deterministic: RL needs some fair samples to find); the other twin always gets the right
    solution and a positive reply."""
    if against not in SIDES:
        raise LmstackError(f"against must be one of {', '.join(SIDES)}, got {against!r}")
    if not 0.0 <= rate <= 1.0:
        raise LmstackError(f"rate must be in [0, 1], got {rate!r}")
    rng = random.Random(seed)
    rows = []
    for pair in pairs:
        unfair = rng.random() < rate
        for side in SIDES:
            rec = pair.side(side)
            worse = unfair and side == against
            if pair.kind == "arithmetic":
                pronoun = "she" if rec["gender"] == "female" else "he"
                if worse:
                    reply = wrong_solution({**rec, "pronoun": pronoun}, rng)
                else:
                    names = {"N": rec["person"], "p": pronoun, "unit": rec["unit"]}
                    reply = render_solution(rec["start"], [tuple(s) for s in rec["steps"]], names)
            else:
                reply = _reply(rec, not worse, rng)
            rows.append({"id": f"organism/{rec['id']}", "kind": f"organism_{pair.kind}", "messages": [
                {"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": reply}]})
    return rows
