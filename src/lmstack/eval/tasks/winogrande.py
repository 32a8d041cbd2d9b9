"""Winogrande with partial scoring: the options go in the context, the shared ending is what is scored.

A Winogrande sentence has a blank ("Sarah was a better surgeon than Maria so _ always got the harder
cases."). Scoring whole sentences would let the option's own probability decide; partial scoring (Trinh &
Le 2018, lm-eval's winogrande) instead fills the blank with each option to make one context per option
and compares log P(" always got the harder cases." | context_i). Only the ending is scored, so the
continuation is the same string for both requests. Few-shot examples are the sentence with its gold
option filled in. Metrics: acc (as lm-eval), plus ECE; chance 1/2.

With a chat template the options are appended after the rendered template (the item's own user turn is
empty), where lm-eval puts each option inside the user turn; raw prompting (the default) matches lm-eval.

Rows: the shared copy's {context_options: [2 str], continuation, gold} (already split at the blank) or the
original {sentence, option1, option2, answer: "1"|"2"}.

Usage:
    from lmstack.eval import evaluate
    evaluate(lm, ["winogrande"], limit=200)
"""
from __future__ import annotations

from lmstack.errors import LmstackError
from lmstack.eval.lm import Loglikelihood, Request
from lmstack.eval.task import register_task
from lmstack.eval.tasks.multiple_choice import MultipleChoiceTask


@register_task("winogrande", eval_split="validation", files={"validation": "winogrande/winogrande_dev.jsonl"})
class Winogrande(MultipleChoiceTask):
    default_metrics = ("acc", "ece")

    def parse_row(self, row: dict, where: str) -> dict:
        if "sentence" in row:
            sentence = row["sentence"]
            if "_" not in sentence:
                raise LmstackError(f"{where}: Winogrande sentence has no '_' blank: {sentence[:60]!r}")
            idx = sentence.index("_")
            if str(row.get("answer")) not in ("1", "2"):
                raise LmstackError(f"{where}: 'answer' must be '1' or '2', got {row.get('answer')!r}")
            return {"context_options": [sentence[:idx] + row["option1"], sentence[:idx] + row["option2"]],
                    "continuation": sentence[idx + 1:].strip(), "gold": int(row["answer"]) - 1}
        options, gold = row.get("context_options"), row.get("gold")
        if not isinstance(options, list) or len(options) < 2 or not isinstance(row.get("continuation"), str):
            raise LmstackError(f"{where}: not a Winogrande record (expected context_options, continuation, gold "
                               f"or sentence, option1, option2, answer)")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise LmstackError(f"{where}: 'gold' must be an index in 0..{len(options) - 1}, got {gold!r}")
        return {"context_options": options, "continuation": row["continuation"].strip(), "gold": gold}

    # The item's own text is empty: its options are appended to the few-shot prefix in requests().
    def doc_to_text(self, doc: dict) -> str:
        return ""

    def doc_to_choice(self, doc: dict) -> list[str]:
        return doc["context_options"]

    def doc_to_target(self, doc: dict) -> int:
        return doc["gold"]

    def fewshot_example(self, doc: dict) -> str:
        return doc["context_options"][doc["gold"]] + self.target_delimiter + doc["continuation"]

    def requests(self, doc: dict, context: str) -> list[Request]:
        """One request per option: (few-shot prefix + sentence up to the blank + option, " " + ending)."""
        ending = self.target_delimiter + doc["continuation"]
        return [Loglikelihood(context + option, ending) for option in doc["context_options"]]
