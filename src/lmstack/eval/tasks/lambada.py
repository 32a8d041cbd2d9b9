"""LAMBADA-style last-word prediction from any {context, continuation} JSONL (or lm-eval's {text} rows).

One loglikelihood request per item: log P(continuation | context), and whether greedy decoding would
produce exactly that continuation. Metrics (lm-eval's lambada_openai):
    acc        = the continuation is the greedy one (the model "predicts the last word")
    perplexity = exp(-mean log-likelihood of the continuation), lower is better
A {text} row is split as lm-eval does: context = every word but the last, continuation = " " + last word.
For {context, continuation} rows the continuation is used as written; a space is put between the two
only when neither side has whitespace at the join (so "... the" + "dog" scores " dog").

The default file is data_dir()/lambada/lambada_test.jsonl (not in the shared data; pass path=...).

Usage:
    from lmstack.eval import evaluate, get_task
    evaluate(lm, [get_task("lambada", path="lambada_test.jsonl")])   # acc, perplexity (+ stderr)
"""
from __future__ import annotations

import math
from typing import Callable

from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.task import register_task
from lmstack.eval.tasks.multiple_choice import FileTask


def perplexity(lls: list[float]) -> float:
    """exp of the negative mean log-likelihood (lm-eval's perplexity aggregation)."""
    return math.exp(-M.mean([float(x) for x in lls]))


@register_task("lambada", files={"test": "lambada/lambada_test.jsonl"})
class Lambada(FileTask):
    output_type = "loglikelihood"
    default_metrics = ("acc", "perplexity")
    target_delimiter = ""     # the continuation carries its own leading space

    def parse_row(self, row: dict, where: str) -> dict:
        if isinstance(row.get("text"), str):
            words = row["text"].split(" ")
            if len(words) < 2:
                raise LmstackError(f"{where}: a LAMBADA text needs at least two words")
            return {"context": " ".join(words[:-1]), "continuation": " " + words[-1]}
        context, cont = row.get("context"), row.get("continuation")
        if not isinstance(context, str) or not isinstance(cont, str) or not cont.strip():
            raise LmstackError(f"{where}: expected {{context, continuation}} strings (or {{text}}), "
                               f"got keys {', '.join(sorted(row)) or 'none'}")
        if context and not context[-1].isspace() and not cont[0].isspace():
            cont = " " + cont
        return {"context": context, "continuation": cont}

    def doc_to_text(self, doc: dict) -> str:
        return doc["context"]

    def doc_to_target(self, doc: dict) -> str:
        return doc["continuation"]

    def process_results(self, doc: dict, responses: list) -> dict:
        ll, greedy = responses[0]
        return {"acc": float(greedy), "perplexity": float(ll)}

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        return {"acc": M.mean, "perplexity": perplexity}
