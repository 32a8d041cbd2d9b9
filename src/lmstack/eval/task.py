"""Tasks as small Python classes: data loading, prompts, few-shot contexts, requests and per-item metrics.

A task turns each document (a dict) into a prompt and one or more LM requests, then turns the LM's answers
back into per-item metric values. One form everywhere: a Task subclass registered under a name.
Multiple-choice tasks follow lm-eval: the prompt is doc_to_text(doc), each choice is scored as the
continuation target_delimiter + choice, and few-shot examples are joined by fewshot_delimiter.

Usage:
    from lmstack.eval.task import Task, register_task, get_task, list_tasks

    @register_task("toy_mc")
    class ToyMC(Task):
        def docs(self, split):  return [{"q": "1+1", "choices": ["2", "3"], "gold": 0}]
        def doc_to_text(self, doc):   return f"Question: {doc['q']}\\nAnswer:"
        def doc_to_choice(self, doc): return doc["choices"]
        def doc_to_target(self, doc): return doc["gold"]

    task = get_task("toy_mc")
    context = task.fewshot_context(doc, num_fewshot=0)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import random
from typing import Any, Callable

from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.lm import GenArgs, GenerateUntil, Loglikelihood, Request, Rolling

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "rolling", "generate_until")


class TaskDataMissing(LmstackError):
    """A task's data file is absent; the evaluator records the task as skipped and goes on."""


def data_dir() -> Path:
    """Where real benchmark data lives: $LMSTACK_DATA, else the `shared/data` folder beside the checkout."""
    env = os.environ.get("LMSTACK_DATA")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()


def require_file(path: str | Path, task: str) -> Path:
    """`path` if it is a file, else TaskDataMissing naming the task and the path."""
    p = Path(path)
    if not p.is_file():
        # The LMSTACK_DATA hint helps only for the built-in data files, not for a path the user gave.
        inside = data_dir() in p.resolve().parents
        raise TaskDataMissing(f"task {task!r}: data file {p} is missing"
                              + (" (set LMSTACK_DATA to the data folder)" if inside else ""))
    return p


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmstackError(f"{path}:{n} is not valid JSON: {e.msg}") from None
    return rows


class Task:
    """One benchmark. Subclasses fill in docs/doc_to_text/doc_to_choice/doc_to_target (and more if odd)."""

    name: str = ""
    output_type: str = "multiple_choice"
    eval_split: str = "test"
    fewshot_split: str | None = None
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    description: str = ""
    """Text put before the few-shot examples (e.g. MMLU's subject line)."""
    default_metrics: tuple[str, ...] = ("acc", "acc_norm")

    def __init__(self, **kwargs: Any):
        for key, value in kwargs.items():
            if key.startswith("_") or not hasattr(self, key) or callable(getattr(type(self), key, None)):
                raise LmstackError(f"task {self.name or type(self).__name__!r} has no setting {key!r}")
            setattr(self, key, value)
        if self.output_type not in OUTPUT_TYPES:
            raise LmstackError(f"task {self.name!r}: output_type={self.output_type!r}; choose one of "
                               f"{', '.join(OUTPUT_TYPES)}")
        self._docs_cache: dict[str, list[dict]] = {}

    # -- data ------------------------------------------------------------------------------------------
    def docs(self, split: str) -> list[dict]:
        raise NotImplementedError(f"task {self.name!r} must define docs(split)")

    def cached_docs(self, split: str) -> list[dict]:
        if split not in self._docs_cache:
            self._docs_cache[split] = list(self.docs(split))
        return self._docs_cache[split]

    # -- prompts ---------------------------------------------------------------------------------------
    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError(f"task {self.name!r} must define doc_to_text(doc)")

    def doc_to_choice(self, doc: dict) -> list[str]:
        raise NotImplementedError(f"task {self.name!r} is multiple-choice and must define doc_to_choice(doc)")

    def doc_to_target(self, doc: dict) -> int | str:
        raise NotImplementedError(f"task {self.name!r} must define doc_to_target(doc)")

    def target_text(self, doc: dict) -> str:
        target = self.doc_to_target(doc)
        if self.output_type == "multiple_choice" and isinstance(target, int):
            return self.doc_to_choice(doc)[target]
        return str(target)

    def fewshot_example(self, doc: dict) -> str:
        return self.doc_to_text(doc) + self.target_delimiter + self.target_text(doc)

    def gen_args(self, doc: dict) -> GenArgs:
        return GenArgs(until=["\n\n"])

    def fewshot_docs(self, doc: dict, num_fewshot: int, seed: int = 1234, exclude: dict | None = None) -> list[dict]:
        """`num_fewshot` examples drawn with a fixed seed from fewshot_split (else eval_split), never `doc`
        (nor `exclude`: the original of a transformed doc)."""
        if num_fewshot <= 0:
            return []
        pool = self.cached_docs(self.fewshot_split or self.eval_split)
        # A fresh generator per call keeps each item's shots independent of evaluation order (and of --limit).
        rng = random.Random(seed)
        picked = rng.sample(range(len(pool)), min(num_fewshot + 1, len(pool)))
        banned = [d for d in (doc, exclude) if d is not None]
        shots = [pool[i] for i in picked if not any(pool[i] is d or pool[i] == d for d in banned)][:num_fewshot]
        if len(shots) < num_fewshot:
            raise LmstackError(f"task {self.name!r}: asked for {num_fewshot} few-shot examples but split "
                               f"{self.fewshot_split or self.eval_split!r} has only {len(shots)} others")
        return shots

    def fewshot_context(self, doc: dict, num_fewshot: int = 0, seed: int = 1234,
                        chat: Callable[[list[dict]], str] | None = None, exclude: dict | None = None) -> str:
        """The prompt for `doc`: description, few-shot examples, then the question.

        With `chat` (a renderer: messages -> text ending in the assistant prefix) each shot becomes a
        user/assistant pair and the question the last user turn, as lm-eval's --apply_chat_template does."""
        # `exclude` only when given, so subclasses overriding fewshot_docs(doc, n, seed) keep working.
        shots = self.fewshot_docs(doc, num_fewshot, seed, **({"exclude": exclude} if exclude is not None else {}))
        if chat is None:
            parts = [self.fewshot_example(s) for s in shots] + [self.doc_to_text(doc)]
            return self.description + self.fewshot_delimiter.join(parts)
        messages = []
        if self.description:
            messages.append({"role": "system", "content": self.description.strip()})
        for s in shots:
            messages.append({"role": "user", "content": self.doc_to_text(s)})
            messages.append({"role": "assistant", "content": self.target_text(s)})
        messages.append({"role": "user", "content": self.doc_to_text(doc)})
        return chat(messages)

    # -- requests and results --------------------------------------------------------------------------
    def requests(self, doc: dict, context: str) -> list[Request]:
        if self.output_type == "multiple_choice":
            return [Loglikelihood(context, self.target_delimiter + c) for c in self.doc_to_choice(doc)]
        if self.output_type == "loglikelihood":
            return [Loglikelihood(context, self.target_delimiter + self.target_text(doc))]
        if self.output_type == "rolling":
            return [Rolling(self.doc_to_text(doc))]
        return [GenerateUntil(context, self.gen_args(doc))]

    def process_results(self, doc: dict, responses: list) -> dict[str, float]:
        if self.output_type == "multiple_choice":
            lls = [r[0] for r in responses]
            gold = self.doc_to_target(doc)
            choices = self.doc_to_choice(doc)
            out = {"acc": M.acc(lls, gold), "acc_norm": M.acc_norm(lls, choices, gold)}
            return {k: v for k, v in out.items() if k in self.default_metrics} or out
        if self.output_type == "loglikelihood":
            ll, greedy = responses[0]
            return {"acc": float(greedy), "perplexity": ll}
        if self.output_type == "rolling":
            return {"loglikelihood": float(responses[0])}
        return {"exact_match": M.exact_match(responses[0], self.target_text(doc))}

    def aggregation(self) -> dict[str, Callable[[list], float]]:
        return {m: M.mean for m in self.default_metrics}

    def higher_is_better(self) -> dict[str, bool]:
        return {m: m not in ("perplexity", "ece", "bits_per_byte", "word_perplexity") for m in self.default_metrics}

    def chance(self, doc: dict) -> float | None:
        if self.output_type == "multiple_choice":
            return 1.0 / len(self.doc_to_choice(doc))
        return None


# -- registry ------------------------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[Callable[..., Task], dict]] = {}


def register_task(name: str, **defaults: Any):
    """Decorator: register a Task subclass (or a factory returning a Task) under `name`.

    `defaults` are keyword arguments passed at construction, so one class can serve several tasks
    (e.g. arc_easy and arc_challenge)."""
    def wrap(obj):
        if name in _REGISTRY and _REGISTRY[name][0] is not obj:
            raise LmstackError(f"task {name!r} is registered twice")
        _REGISTRY[name] = (obj, defaults)
        return obj
    return wrap


def _ensure_loaded() -> None:
    # lazy: importing registers the built-in tasks, on first use
    import lmstack.eval.tasks  # noqa: F401 - importing registers the built-in tasks


def list_tasks() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_task(name: str, **kwargs: Any) -> Task:
    """A fresh Task registered as `name`; an unknown name is an error listing the available tasks."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise LmstackError(f"unknown task {name!r}; available tasks: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    factory, defaults = _REGISTRY[name]
    task = factory(**{**defaults, **kwargs})
    task.name = kwargs.get("name", name)  # one class may serve several names (arc_easy, arc_challenge)
    return task
