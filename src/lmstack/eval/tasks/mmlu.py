"""MMLU (Hendrycks et al.): 57 subjects of 4-way multiple choice, lm-eval's prompt, few-shot from dev.

Prompt (lm-eval's default MMLU template), with a per-subject description before the few-shot examples:
    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:        choices " A" " B" " C" " D"
Few-shot examples are the first n rows of the subject's dev file (lm-eval's first_n sampler), the
standard 5-shot setup when run with num_fewshot=5. Metrics: acc (lm-eval reports no acc_norm here), ECE.

Files: <root>/<split>/<subject>_<split>.csv with root = data_dir()/mmlu (or path=...). Both CSV layouts
load: with a header row `question,choice0..choice3,answer` and a 0-3 answer (the copy in ../shared/data),
or the original Berkeley files with no header and an A-D answer. Our shared copy holds only dev; pass
eval_split="dev" to evaluate on it (each item's shots are then the other dev rows of its subject).

Tasks: "mmlu" (every subject present; acc over all items, i.e. lm-eval's size-weighted group mean),
"mmlu_<subject>" for each of the 57 subjects, and "mmlu_dev" (all subjects on the dev split, for when only
dev is at hand, as in ../shared/data; its scores are not comparable with published test-set numbers).

Usage:
    from lmstack.eval import evaluate, get_task
    evaluate(lm, ["mmlu"], num_fewshot=5)                                  # needs mmlu/test/*.csv
    evaluate(lm, [get_task("mmlu_anatomy", eval_split="dev")], num_fewshot=4)
    evaluate(lm, ["mmlu_dev"], num_fewshot=4)                            # the shared copy (dev only)
"""
from __future__ import annotations

import csv
from pathlib import Path

from lmstack.errors import LmstackError
from lmstack.eval.task import TaskDataMissing, data_dir, register_task
from lmstack.eval.tasks.multiple_choice import MultipleChoiceTask

SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_mathematics high_school_microeconomics high_school_physics high_school_psychology "
    "high_school_statistics high_school_us_history high_school_world_history human_aging human_sexuality "
    "international_law jurisprudence logical_fallacies machine_learning management marketing "
    "medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory "
    "professional_accounting professional_law professional_medicine professional_psychology "
    "public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()

LETTERS = "ABCD"
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def _answer_index(raw: str, where: str) -> int:
    ans = raw.strip()
    if len(ans) == 1 and ans.upper() in LETTERS:
        return LETTERS.index(ans.upper())
    if ans in ("0", "1", "2", "3"):
        return int(ans)
    raise LmstackError(f"{where}: answer must be A-D or 0-3, got {raw!r}")


def read_mmlu_csv(path: str | Path, subject: str) -> list[dict]:
    """Rows of one MMLU CSV (header + 0-3 answers, or no header + A-D answers) as
    {subject, question, choices: [4 str], gold: int}."""
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not docs and [c.strip().lower() for c in row] == HEADER:
                continue                                         # the header of the 0-3 layout
            if not any(c.strip() for c in row):
                continue
            if len(row) != 6:
                raise LmstackError(f"{where}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
            docs.append({"subject": subject, "question": row[0], "choices": row[1:5],
                         "gold": _answer_index(row[5], where)})
    return docs


def describe(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


class MMLU(MultipleChoiceTask):
    """One subject (subject="anatomy") or all of them (subject="")."""

    eval_split = "test"
    fewshot_split = "dev"
    default_metrics = ("acc", "ece")
    subject: str = ""
    """One MMLU subject; empty means all 57."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.subject and self.subject not in SUBJECTS:
            raise LmstackError(f"unknown MMLU subject {self.subject!r}; subjects: {', '.join(SUBJECTS)}")

    def root(self) -> Path:
        return Path(self.path) if self.path else data_dir() / "mmlu"

    def docs(self, split: str) -> list[dict]:
        subjects = [self.subject] if self.subject else list(SUBJECTS)
        folder = self.root() / split
        found = [(s, folder / f"{s}_{split}.csv") for s in subjects if (folder / f"{s}_{split}.csv").is_file()]
        if not found:
            raise TaskDataMissing(f"task {self.name!r}: no MMLU {split} data, expected "
                                  f"{folder / (subjects[0] + '_' + split + '.csv')} (set LMSTACK_DATA or path=; "
                                  f"the shared copy has only dev: use eval_split='dev')")
        docs = []
        for subject, file in found:
            docs.extend(read_mmlu_csv(file, subject))
        return docs

    def fewshot_docs(self, doc: dict, num_fewshot: int, seed: int = 1234) -> list[dict]:
        """The first `num_fewshot` dev rows of the item's own subject (lm-eval's first_n), skipping the item
        itself when it is a dev row. `seed` is unused: the choice is fixed by design."""
        if num_fewshot <= 0:
            return []
        pool = [d for d in self.cached_docs(self.fewshot_split) if d["subject"] == doc["subject"] and d != doc]
        if len(pool) < num_fewshot:
            raise LmstackError(f"task {self.name!r}: asked for {num_fewshot} few-shot examples but subject "
                               f"{doc['subject']!r} has only {len(pool)} other dev rows")
        return pool[:num_fewshot]

    def fewshot_context(self, doc: dict, num_fewshot: int = 0, seed: int = 1234, chat=None) -> str:
        # The description names the item's subject, and "mmlu" mixes subjects, so set it per item.
        self.description = describe(doc["subject"])
        return super().fewshot_context(doc, num_fewshot, seed, chat)

    def doc_to_text(self, doc: dict) -> str:
        a, b, c, d = doc["choices"]
        return f"{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"

    def doc_to_choice(self, doc: dict) -> list[str]:
        return list(LETTERS)

    def doc_to_target(self, doc: dict) -> int:
        return doc["gold"]


register_task("mmlu")(MMLU)
register_task("mmlu_dev", eval_split="dev")(MMLU)
for _subject in SUBJECTS:
    register_task(f"mmlu_{_subject}", subject=_subject)(MMLU)
