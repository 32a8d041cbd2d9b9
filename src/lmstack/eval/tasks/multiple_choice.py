"""Multiple-choice tasks: the shared base (acc, acc_norm, ECE, chance) and the generic JSONL loader.

A multiple-choice item is scored as lm-eval does: each choice becomes the continuation
target_delimiter + choice of one loglikelihood request, the prediction is the choice with the highest
log-likelihood (acc), or the highest log-likelihood per character of the choice (acc_norm). On top of
that every task here reports ECE, the expected calibration error of the softmax over the choices'
log-likelihoods, so a model that is right 30% of the time but 90% sure shows up as overconfident.

Data files are found through `files` (split -> path under lmstack.eval.task.data_dir()); a `path` setting
replaces the eval split's file. A missing file raises TaskDataMissing naming the path (the evaluator
then skips the task); a malformed record raises LmstackError naming the file and line.

Usage:
    from lmstack.eval import evaluate, get_task
    task = get_task("multiple_choice", path="my_mc.jsonl")   # rows: {"query", "choices", "gold"}
    evaluate(lm, [task], limit=50)["results"]["multiple_choice"]["metrics"]   # acc, acc_norm, ece + stderrs
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.task import Task, data_dir, read_jsonl, register_task, require_file


def ece_of_items(items: list) -> float:
    """ECE over per-item (choice log-likelihoods, gold index) pairs (a corpus-level metric, so the
    per-item value keeps what the aggregate needs, as lm-eval does for f1/mcc)."""
    items = list(items)
    return M.ece([list(lls) for lls, _ in items], [int(gold) for _, gold in items])


def check_mc_row(row: dict, where: str) -> None:
    """Raise LmstackError unless `row` is a {query: str, choices: [str, ...], gold: int in range} record."""
    missing = [k for k in ("query", "choices", "gold") if k not in row]
    if missing:
        raise LmstackError(f"{where}: multiple-choice record lacks {', '.join(missing)} "
                           f"(expected keys query, choices, gold; got {', '.join(sorted(row)) or 'none'})")
    choices, gold = row["choices"], row["gold"]
    if not isinstance(row["query"], str):
        raise LmstackError(f"{where}: 'query' must be a string, got {type(row['query']).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise LmstackError(f"{where}: 'choices' must be a list of at least 2 strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise LmstackError(f"{where}: 'gold' must be an index in 0..{len(choices) - 1}, got {gold!r}")


class FileTask(Task):
    """A task whose data is one file per split under data_dir() (or `path` for the eval split)."""

    files: dict[str, str] = {}
    """split -> data file, relative to data_dir()."""
    path: str = ""
    """A data file to use for the eval split instead of the one under data_dir()."""

    def data_path(self, split: str) -> Path:
        if split == self.eval_split and self.path:
            return require_file(self.path, self.name)
        if split not in self.files:
            raise LmstackError(f"task {self.name!r} has no split {split!r}; splits: {', '.join(self.files)}")
        return require_file(data_dir() / self.files[split], self.name)

    def docs(self, split: str) -> list[dict]:
        path = self.data_path(split)
        return [self.parse_row(row, f"{path}:{n}") for n, row in enumerate(read_jsonl(path), 1)]

    def parse_row(self, row: dict, where: str) -> dict:
        """A raw record -> the task's doc; `where` ("file:line") goes into any error message."""
        return row


class MultipleChoiceTask(FileTask):
    """Base for every multiple-choice task here: acc / acc_norm / ECE, chance = 1/n_choices (Task's).

    Subclasses set `files`, implement parse_row (raw record -> normalised doc) and the three doc_to_*
    methods. `default_metrics` lists what the task reports; include "acc_norm" only where lm-eval does."""

    output_type = "multiple_choice"
    default_metrics: tuple[str, ...] = ("acc", "acc_norm", "ece")

    # -- results -----------------------------------------------------------------------------------------
    def gold_for_ece(self, doc: dict, lls: list[float]) -> int:
        """The gold index ECE compares the prediction against (one gold per item for most tasks)."""
        return int(self.doc_to_target(doc))

    def process_results(self, doc: dict, responses: list) -> dict:
        lls = [float(r[0]) for r in responses]
        gold = self.doc_to_target(doc)
        out: dict = {}
        if "acc" in self.default_metrics:
            out["acc"] = M.acc(lls, gold)
        if "acc_norm" in self.default_metrics:
            out["acc_norm"] = M.acc_norm(lls, self.doc_to_choice(doc), gold)
        if "ece" in self.default_metrics:
            out["ece"] = (lls, self.gold_for_ece(doc, lls))
        return out

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        aggs: dict[str, Callable[[list], float]] = {m: M.mean for m in self.default_metrics}
        if "ece" in aggs:
            aggs["ece"] = ece_of_items
        return aggs


@register_task("multiple_choice")
class JsonlMultipleChoice(MultipleChoiceTask):
    """Any {query, choices, gold} JSONL file (path=...): the prompt is the query as written, each choice is
    scored as " " + choice. Few-shot examples come from the same file (never the item itself)."""

    def data_path(self, split: str) -> Path:
        if not self.path:
            raise LmstackError("task 'multiple_choice' needs path=<a JSONL file of {query, choices, gold} rows>")
        if split != self.eval_split:
            raise LmstackError(f"task {self.name!r} reads one file; it has no split {split!r}")
        return require_file(self.path, self.name)

    def parse_row(self, row: dict, where: str) -> dict:
        check_mc_row(row, where)
        return row

    def doc_to_text(self, doc: dict) -> str:
        return doc["query"]

    def doc_to_choice(self, doc: dict) -> list[str]:
        return doc["choices"]

    def doc_to_target(self, doc: dict) -> int:
        return doc["gold"]
