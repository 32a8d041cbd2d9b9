"""Hallucination flag by self-consistency: ask k times, and distrust answers the model does not agree with.

A model that knows a fact gives the same answer under sampling; one that is guessing scatters
(SelfCheckGPT's and self-consistency's observation). So sample k answers, normalise them (case,
punctuation, spacing, number formatting), take the majority and its share of the k samples: the
agreement rate. A rate under a threshold flags the answer as uncertain -- a cheap hallucination detector
that needs no reference answer. GSM8K's maj@k and the alignment stage's self-consistency use the same vote
(`agreement`, `flag_uncertain` and the answer normaliser `normalize` live in lmstack.world.checkers).

Usage:
    from lmstack.world.checkers import agreement, flag_uncertain
    from lmstack.eval.hallucination import sample_agreement
    agreement(["Paris", "paris.", "Lyon"])          # ("paris", 0.667)
    flag_uncertain(0.667, threshold=0.7)            # True: flag it
    sample_agreement(lm, ["Q: Where was Ada born?\\nA:"], k=5, until=["\\n"])   # [{"majority": ..., ...}]
"""
from __future__ import annotations

from typing import Callable
import zlib

# Answer normalising, the vote and the flag are the world's answer-matching checkers, shared with align's
# self-consistency (align/ does not import eval/).
from lmstack.eval.lm import GenArgs
from lmstack.world.checkers import agreement, flag_uncertain


def chain_seed(prompt: str, base: int, i: int) -> int:
    """The seed of sample i of `prompt`: distinct for each i, and different across prompts, so the same
    random draws do not drive every item's samples alike (seeded sampling correlates items otherwise)."""
    return (zlib.crc32(prompt.encode("utf-8")) + base + 7919 * i) % 2**31


def sample_agreement(lm, prompts: list[str], k: int = 5, until: list[str] | None = None, max_gen_toks: int = 32,
                     temperature: float = 0.8, seed: int = 0, threshold: float = 0.5,
                     extract: Callable[[str], str | None] | None = None) -> list[dict]:
    """Sample `k` answers per prompt from `lm` (distinct seeds, see chain_seed) and score their agreement.

    Returns one dict per prompt: majority, agreement (rate), uncertain (flag), answers (raw samples).
    `extract` pulls the answer out of a generation (default: the generation itself)."""

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if temperature <= 0 and k > 1:
        raise ValueError("sampling k > 1 answers needs temperature > 0 (greedy answers always agree)")
    requests = [(p, GenArgs(until=list(until or []), max_gen_toks=max_gen_toks, temperature=temperature,
                            seed=chain_seed(p, seed, i))) for p in prompts for i in range(k)]
    outs = lm.generate_until(requests)
    results = []
    for j in range(len(prompts)):
        raw = outs[j * k:(j + 1) * k]
        answers = [extract(t) if extract else t for t in raw]
        majority, rate = agreement(answers)
        results.append({"majority": majority, "agreement": rate, "uncertain": flag_uncertain(rate, threshold),
                        "answers": raw})
    return results
