"""Self-consistency: sample k chains of thought, extract each final answer, and take the majority vote.

Different reasoning paths that reach the same answer are evidence for it (Wang et al., 2022), so maj@k
usually beats the single greedy chain. The vote's agreement rate (share of the k chains that give the
majority answer) doubles as an uncertainty signal: low agreement flags a likely hallucination. Voting,
normalising and flagging are the world's answer checkers (lmstack.world.checkers: `normalize`, `agreement`,
`flag_uncertain`), which the eval harness's hallucination flag uses too: one definition of "uncertain".

Usage:
    from lmstack.align.self_consistency import vote, self_consistency, compare_greedy_majority
    vote(["... #### 12", "... #### 12", "... #### 7"])          # Vote(answer='12', agreement=0.667, ...)
    votes = self_consistency(policy, tok, records, k=8)         # one Vote per record
    compare_greedy_majority(policy, tok, records, k=8)          # greedy acc, maj@k acc, flagged vs unflagged
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmstack.align.rewards.verifiable import target_answer
from lmstack.align.rollout import mean_stderr, sample
from lmstack.world.checkers import agreement, extract_answer, flag_uncertain, normalize


def gsm8k_answer(text: str) -> str | None:
    """The default extractor: the integer after the last `####` (GSM8K / the world's arithmetic), as text."""
    found = extract_answer(text)
    return None if found is None else str(found)


def record_truth(record: dict) -> str | None:
    """The reference answer of a record for comparison with voted answers: its `answer` (an integer for
    arithmetic and GSM8K answer text, a fact string for qa)."""

    number = target_answer(record)
    if number is not None:
        return str(number)
    answer = record.get("answer")
    return answer if isinstance(answer, str) else None


@dataclass
class Vote:
    answer: str | None
    """The majority answer (normalised); None when no chain gave an answer."""
    agreement: float
    """Share of the k chains that gave the majority answer (chains without an answer count as dissent)."""
    uncertain: bool
    """agreement < threshold: the hallucination/uncertainty flag."""
    answers: list[str | None] = field(default_factory=list)
    """The extracted answer of each chain (None = nothing extracted)."""


def vote(texts: Sequence[str], extractor: Callable[[str], str | None] = gsm8k_answer,
         threshold: float = 0.5) -> Vote:
    """Majority vote over the final answers of `texts` (checkers.agreement; ties go to the first seen)."""
    answers = [extractor(t) for t in texts]
    majority, rate = agreement(answers)
    return Vote(majority, rate, flag_uncertain(rate, threshold), answers)


def self_consistency(policy: torch.nn.Module, tok, records: Sequence[dict], k: int = 8, temperature: float = 1.0,
                     max_new_tokens: int = 128, seed: int = 0, threshold: float = 0.5,
                     extractor: Callable[[str], str | None] = gsm8k_answer, template: str = "auto") -> list[Vote]:
    """Sample k chains per record (rollout.sample, n=k) and vote; one Vote per record."""
    if k < 2:
        raise ValueError(f"self-consistency needs k >= 2 sampled chains, got k={k}")
    ro = sample(policy, tok, records, n=k, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                template=template)
    return [vote(ro.texts[i * k:(i + 1) * k], extractor, threshold) for i in range(len(records))]


def _accuracy(correct: list[bool]) -> dict[str, float]:
    mean, se, n = mean_stderr(torch.tensor([float(c) for c in correct]))
    return {"mean": mean, "stderr": se, "n": n}


def compare_greedy_majority(policy: torch.nn.Module, tok, records: Sequence[dict], k: int = 8,
                            temperature: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                            threshold: float = 0.5, extractor: Callable[[str], str | None] = gsm8k_answer,
                            truth: Callable[[dict], str | None] = record_truth,
                            template: str = "auto") -> dict:
    """Greedy accuracy vs maj@k accuracy on `records` (each {"mean", "stderr", "n"}), plus pass@k (any chain
    right), the mean agreement, and maj@k and greedy accuracy among flagged (agreement < threshold) and
    unflagged items: a useful flag has clearly lower accuracy on the flagged side."""
    records = [r for r in records if truth(r) is not None]
    if not records:
        raise ValueError("no record has a reference answer to compare with")
    gold = [normalize(truth(r)) for r in records]
    greedy = sample(policy, tok, records, n=1, max_new_tokens=max_new_tokens, temperature=0.0, template=template)
    greedy_ok = [normalize(extractor(t)) == g for t, g in zip(greedy.texts, gold)]
    votes = self_consistency(policy, tok, records, k, temperature, max_new_tokens, seed, threshold, extractor,
                             template)
    maj_ok = [v.answer is not None and v.answer == g for v, g in zip(votes, gold)]
    any_ok = [any(normalize(a) == g for a in v.answers) for v, g in zip(votes, gold)]
    flagged = [v.uncertain for v in votes]

    def subset(values: list[bool], want: bool) -> dict[str, float]:
        return _accuracy([c for c, f in zip(values, flagged) if f == want])

    return {"k": k, "threshold": threshold, "n": len(records), "greedy": _accuracy(greedy_ok),
            "majority": _accuracy(maj_ok), "pass_at_k": _accuracy(any_ok),
            "mean_agreement": sum(v.agreement for v in votes) / len(votes),
            "flagged_fraction": sum(flagged) / len(flagged),
            "majority_flagged": subset(maj_ok, True), "majority_unflagged": subset(maj_ok, False),
            "greedy_flagged": subset(greedy_ok, True), "greedy_unflagged": subset(greedy_ok, False)}
