"""GSM8K: grade-school math word problems answered by a generated chain of thought.

The model writes a worked solution; the answer is the number after "####" (strict match), or, when the
model never writes "####", the last number in its text (the flexible fallback of lm-eval's
"flexible-extract"). Answers are compared after normalising ("1,000" == "1000", "$18." == "18",
"5.0" == "5"). Few-shot examples come from the train split with the fixed seed.

Two prompt styles:
  gsm8k      "Question: ...\\nAnswer:" with the dataset's own worked solutions as shots (lm-eval's gsm8k);
  gsm8k_cot  "Q: ...\\nA:" with the solution rewritten as plain reasoning ending in "The answer is N."
             (Wei et al.'s chain-of-thought format); strict extraction reads "The answer is N".

Self-consistency (Wang et al., 2022): with k > 1, each problem also gets k sampled chains (temperature > 0,
k distinct seeds per problem, hallucination.chain_seed) and the metric `maj@{k}` scores their majority answer
(lmstack.world.checkers.agreement); `agreement` reports how strongly the chains agreed.

Data: data_dir()/gsm8k/{train,test}.jsonl ({"question", "answer"}); missing files skip the task.

Usage:
    from lmstack.eval import evaluate, get_task
    evaluate(lm, ["gsm8k"], num_fewshot=5, limit=100)                 # exact_match, exact_match_strict
    evaluate(lm, [get_task("gsm8k_cot", k=8, temperature=0.7)], num_fewshot=8, limit=50)   # + maj@8
"""
from __future__ import annotations

import re
from typing import Callable

from lmstack.world.checkers import agreement, normalize
from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.hallucination import chain_seed
from lmstack.eval.lm import GenArgs, GenerateUntil, Request
from lmstack.eval.task import Task, data_dir, read_jsonl, register_task, require_file

# lm-eval-style patterns, kept apart from lmstack.world.checkers.extract_answer (integers after the last
# "####") on purpose: GSM8K scores must match lm-eval's strict/flexible extraction (decimals, "$", the first
# match, a last-number fallback), while rewards read the world's integer answers.
_NUM = r"(-?\$?\s?[\d,]*\.?\d+)"
AFTER_HASHES = re.compile(r"####\s*" + _NUM)
THE_ANSWER_IS = re.compile(r"[Tt]he answer is\s*:?\s*" + _NUM)
ANY_NUMBER = re.compile(r"-?\$?[\d,]*\.?\d+")


def extract(text: str, strict: re.Pattern = AFTER_HASHES) -> tuple[str | None, str | None]:
    """(flexible answer, strict answer) of a generated solution, both normalised (None when absent).

    Strict: the first match of `strict` (a run-on generation that starts a new problem after its answer
    keeps the first one). Flexible: the strict answer, else the last number of the text."""
    m = strict.search(text)
    strict_ans = normalize(m.group(1)) if m else None
    if strict_ans is not None:
        return strict_ans, strict_ans
    numbers = ANY_NUMBER.findall(text)
    return (normalize(numbers[-1]) if numbers else None), None


def gold_answer(solution: str) -> str:
    """The normalised number after "####" in a reference solution."""
    m = AFTER_HASHES.search(solution)
    if m is None:
        raise LmstackError(f"reference solution has no '#### <answer>': {solution[-80:]!r}")
    return normalize(m.group(1))


class ChainOfThoughtTask(Task):
    """Generate a solution, extract the final number, exact match; maj@k over sampled chains when k > 1.

    Subclasses give docs/doc_to_text/doc_to_target and `gold(doc)` (the normalised answer)."""

    output_type = "generate_until"
    default_metrics = ("exact_match", "exact_match_strict")
    strict_pattern: re.Pattern = AFTER_HASHES
    until: tuple[str, ...] = ("Question:", "\n\n")
    k: int = 1
    """Sampled chains per problem for maj@k (1 = greedy only)."""
    temperature: float = 0.7
    """Sampling temperature of the maj@k chains (must be > 0 when k > 1)."""
    top_p: float = 1.0
    """Nucleus mass of the maj@k chains."""
    sample_seed: int = 0
    """Base seed of the sampled chains (chain i of a prompt uses hallucination.chain_seed(prompt, base, i))."""
    max_gen_toks: int = 256
    """Most tokens of a generated solution."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise LmstackError(f"task {self.name!r}: k must be an integer >= 1, got {self.k!r}")
        if self.k > 1 and self.temperature <= 0:
            raise LmstackError(f"task {self.name!r}: maj@k with k={self.k} needs temperature > 0 "
                               f"(greedy chains are identical), got {self.temperature!r}")

    def gold(self, doc: dict) -> str:
        raise NotImplementedError

    def gen_args(self, doc: dict) -> GenArgs:
        return GenArgs(until=list(self.until), max_gen_toks=self.max_gen_toks)

    def requests(self, doc: dict, context: str) -> list[Request]:
        reqs: list[Request] = [GenerateUntil(context, self.gen_args(doc))]
        if self.k > 1:
            reqs += [GenerateUntil(context, GenArgs(until=list(self.until), max_gen_toks=self.max_gen_toks,
                                                    temperature=self.temperature, top_p=self.top_p,
                                                    seed=chain_seed(context, self.sample_seed, i)))
                     for i in range(self.k)]
        return reqs

    def process_results(self, doc: dict, responses: list) -> dict[str, float]:
        gold = self.gold(doc)
        flexible, strict = extract(responses[0], self.strict_pattern)
        out = {"exact_match": float(flexible == gold), "exact_match_strict": float(strict == gold)}
        if self.k > 1:
            majority, rate = agreement([extract(r, self.strict_pattern)[0] for r in responses[1:]])
            out[f"maj@{self.k}"] = float(majority == gold)
            out["agreement"] = rate
        return out

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        names = list(self.default_metrics) + ([f"maj@{self.k}", "agreement"] if self.k > 1 else [])
        return {m: M.mean for m in names}

    def higher_is_better(self) -> dict[str, bool]:
        return {m: True for m in self.aggregation()}


@register_task("gsm8k")
class GSM8K(ChainOfThoughtTask):
    eval_split = "test"
    fewshot_split = "train"
    target_delimiter = " "
    path: str = ""
    """A GSM8K-format JSONL to evaluate instead of data_dir()/gsm8k/test.jsonl."""

    def docs(self, split: str) -> list[dict]:
        if split not in ("train", "test"):
            raise LmstackError(f"task {self.name!r} has no split {split!r}; splits: train, test")
        if split == self.eval_split and self.path:
            path = require_file(self.path, self.name)
        else:
            path = require_file(data_dir() / "gsm8k" / f"{split}.jsonl", self.name)
        rows = read_jsonl(path)
        for n, row in enumerate(rows, 1):
            if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise LmstackError(f"{path}:{n}: expected {{question, answer}} strings")
        return rows

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: dict) -> str:
        return doc["answer"]

    def gold(self, doc: dict) -> str:
        return gold_answer(doc["answer"])


def plain_chain(solution: str) -> str:
    """A GSM8K solution as chain-of-thought prose: calculator annotations dropped, lines joined, and the
    "#### N" line replaced by "The answer is N."."""
    body, _, _ = solution.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body)
    steps = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return f"{steps} The answer is {gold_answer(solution)}."


@register_task("gsm8k_cot")
class GSM8KCoT(GSM8K):
    strict_pattern = THE_ANSWER_IS
    until = ("Q:", "\n\n")

    def doc_to_text(self, doc: dict) -> str:
        return f"Q: {doc['question']}\nA:"

    def doc_to_target(self, doc: dict) -> str:
        return plain_chain(doc["answer"])
