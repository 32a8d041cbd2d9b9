"""The standard zero/few-shot benchmarks with lm-eval's prompts: ARC-Easy/Challenge, HellaSwag, BoolQ, COPA.

Each loader accepts the copy in ../shared/data (llm-foundry's {query, choices, gold} rows, or HellaSwag's
{ctx, endings, label}) and the original Hugging Face record layout, and turns both into the fields
lm-eval's task YAML reads, so the prompt strings are the same as lm-eval's:
    arc_easy / arc_challenge   "Question: {question}\\nAnswer:"          choices " {text}"   acc, acc_norm
    hellaswag                  preprocess(ctx)                          " {ending}"          acc, acc_norm
    boolq                      "{passage}\\nQuestion: {question}?\\nAnswer:"   " no" / " yes"  acc
    copa                       premise without its period + " because"/" therefore"
                               choices " " + choice with a lower-case first letter (delimiter " " too, so
                               two spaces, exactly as lm-eval's copa utils do)                 acc
Every task also reports ECE (calibration) and the evaluator shows chance = 1/n_choices beside it.
Few-shot examples come from the eval file itself (our copies have no train split), never the item itself.

Importing this module also registers MMLU, Winogrande, TruthfulQA, LAMBADA and the generic
multiple-choice loader (their modules sit beside this one).

Usage:
    from lmstack.eval import evaluate, get_task
    task = get_task("arc_easy")
    doc = task.docs("test")[0]
    print(task.fewshot_context(doc, num_fewshot=0))          # "Question: ...\\nAnswer:"
    evaluate(lm, ["arc_easy", "hellaswag", "boolq", "copa"], limit=200)
"""
from __future__ import annotations

import re

from lmstack.errors import LmstackError
from lmstack.eval.task import register_task
from lmstack.eval.tasks.multiple_choice import MultipleChoiceTask, check_mc_row

# The other standard task modules register on import (tasks/__init__ imports only this one).
from lmstack.eval.tasks import lambada, mmlu, truthfulqa, winogrande  # noqa: F401,E402


def _label_index(labels: list[str], key: str, where: str) -> int:
    if key not in labels:
        raise LmstackError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


@register_task("arc_easy", files={"test": "arc/arc_easy_test.jsonl"})
@register_task("arc_challenge", files={"test": "arc/arc_challenge_test.jsonl"})
class ARC(MultipleChoiceTask):
    """AI2 Reasoning Challenge. Rows: llm-foundry's {query: "Question: ...", choices, gold}, HF's
    {question, choices: {text, label}, answerKey}, or AI2's {question: {stem, choices: [{text, label}]},
    answerKey}."""

    def parse_row(self, row: dict, where: str) -> dict:
        if "query" in row:
            check_mc_row(row, where)
            # llm-foundry stored lm-eval's prompt prefix in the query; keep the bare question.
            question = row["query"].removeprefix("Question: ")
            return {"question": question, "choices": row["choices"], "gold": row["gold"]}
        q, key = row.get("question"), str(row.get("answerKey", ""))
        if isinstance(q, dict):                                      # AI2's original layout
            texts = [c["text"] for c in q["choices"]]
            labels = [str(c["label"]) for c in q["choices"]]
            return {"question": q["stem"], "choices": texts, "gold": _label_index(labels, key, where)}
        if isinstance(q, str) and isinstance(row.get("choices"), dict):   # Hugging Face's layout
            labels = [str(x) for x in row["choices"]["label"]]
            return {"question": q, "choices": list(row["choices"]["text"]),
                    "gold": _label_index(labels, key, where)}
        raise LmstackError(f"{where}: not an ARC record (expected query/choices/gold or question/answerKey)")

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_choice(self, doc: dict) -> list[str]:
        return doc["choices"]

    def doc_to_target(self, doc: dict) -> int:
        return doc["gold"]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: strip, WikiHow "[title]" -> ". ", drop other [markers], "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@register_task("hellaswag", eval_split="validation",
               files={"validation": "hellaswag/hellaswag_val_first1000.jsonl"})
class HellaSwag(MultipleChoiceTask):
    """Commonsense sentence completion. Rows: {ctx, endings, label} (our copy: ctx is already
    "activity_label: ctx_a ctx_b") or HF's {activity_label, ctx_a, ctx_b, endings, label}.

    Note: lm-eval builds the query from HF's fields and capitalises ctx_b ("... roof. He"); our copy only
    has the joined ctx, where ctx_b keeps its lower case ("... roof. he"), so on this file the query differs
    from lm-eval-on-HF in that one letter. lm-eval run on the same JSONL (the parity test) sees the same text."""

    def parse_row(self, row: dict, where: str) -> dict:
        if "ctx_a" in row:
            ctx = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
        elif "ctx" in row:
            ctx = row["ctx"]
        else:
            raise LmstackError(f"{where}: not a HellaSwag record (expected ctx or ctx_a/ctx_b, endings, label)")
        endings, label = row.get("endings"), row.get("label")
        if not isinstance(endings, list) or len(endings) < 2:
            raise LmstackError(f"{where}: 'endings' must be a list of at least 2 strings")
        try:
            gold = int(label)
        except (TypeError, ValueError):
            raise LmstackError(f"{where}: 'label' must be an integer, got {label!r}") from None
        if not 0 <= gold < len(endings):
            raise LmstackError(f"{where}: 'label' {gold} is out of range for {len(endings)} endings")
        return {"query": hellaswag_preprocess(ctx), "choices": [hellaswag_preprocess(e) for e in endings],
                "gold": gold}

    def doc_to_text(self, doc: dict) -> str:
        return doc["query"]

    def doc_to_choice(self, doc: dict) -> list[str]:
        return doc["choices"]

    def doc_to_target(self, doc: dict) -> int:
        return doc["gold"]


@register_task("boolq", eval_split="validation", files={"validation": "superglue/boolq_dev.jsonl"})
class BoolQ(MultipleChoiceTask):
    """Yes/no questions about a passage. Rows: llm-foundry's {query: "Passage: P\\nQuestion: Q?", choices:
    ["no", "yes"], gold} or HF's {passage, question, label}. lm-eval's prompt has no "Passage: " prefix,
    so it is removed."""

    default_metrics = ("acc", "ece")

    def parse_row(self, row: dict, where: str) -> dict:
        if "passage" in row:
            return {"passage": row["passage"], "question": row["question"], "label": int(row["label"])}
        check_mc_row(row, where)
        passage, sep, question = row["query"].rpartition("\nQuestion: ")
        if not sep or row["choices"] != ["no", "yes"]:
            raise LmstackError(f"{where}: not a BoolQ record (expected 'Passage: ...\\nQuestion: ...' and "
                               f"choices ['no', 'yes'])")
        # The query ends with the "?" lm-eval's template adds; drop it so the template can add it back.
        question = question[:-1] if question.endswith("?") else question
        return {"passage": passage.removeprefix("Passage: "), "question": question, "label": row["gold"]}

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def doc_to_choice(self, doc: dict) -> list[str]:
        return ["no", "yes"]

    def doc_to_target(self, doc: dict) -> int:
        return doc["label"]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


@register_task("copa", eval_split="validation", files={"validation": "superglue/copa_dev.jsonl"})
class COPA(MultipleChoiceTask):
    """Choice of Plausible Alternatives. Rows: llm-foundry's {query: "<premise>, because|therefore",
    choices, gold} or HF's {premise, choice1, choice2, question: cause|effect, label}."""

    default_metrics = ("acc", "ece")
    CONNECTORS = {"cause": "because", "effect": "therefore"}

    def parse_row(self, row: dict, where: str) -> dict:
        if "premise" in row:
            if row.get("question") not in self.CONNECTORS:
                raise LmstackError(f"{where}: 'question' must be cause or effect, got {row.get('question')!r}")
            # lm-eval drops the premise's final period before adding the connector.
            return {"stem": row["premise"].strip()[:-1], "question": row["question"],
                    "choices": [row["choice1"], row["choice2"]], "label": int(row["label"])}
        check_mc_row(row, where)
        for question, word in self.CONNECTORS.items():
            for suffix in (", " + word, " " + word):
                if row["query"].endswith(suffix):
                    return {"stem": row["query"][:-len(suffix)], "question": question,
                            "choices": row["choices"], "label": row["gold"]}
        raise LmstackError(f"{where}: COPA query must end with 'because' or 'therefore': {row['query'][-40:]!r}")

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['stem']} {self.CONNECTORS[doc['question']]}"

    def doc_to_choice(self, doc: dict) -> list[str]:
        return [" " + _lower_first(c) for c in doc["choices"]]

    def doc_to_target(self, doc: dict) -> int:
        return doc["label"]
