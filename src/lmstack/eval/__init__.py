"""lmstack.eval: an lm-eval-compatible evaluation harness (requests, tasks, metrics, evaluator, backends).

Usage:
    from lmstack.eval import LocalLM, evaluate, list_tasks
    lm = LocalLM("runs/tiny")                        # or OpenAICompletionsLM("http://127.0.0.1:8000", "tiny")
    out = evaluate(lm, ["arc_easy", "hellaswag"], num_fewshot=0, limit=200, out_dir="runs/tiny/eval")
    print(out["results"]["arc_easy"]["metrics"])     # {"acc": ..., "acc_stderr": ..., ...}

Names are imported lazily so `import lmstack.eval` does not pull in torch or httpx until needed.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "LM": "lmstack.eval.lm",
    "GenArgs": "lmstack.eval.lm",
    "Loglikelihood": "lmstack.eval.lm",
    "Rolling": "lmstack.eval.lm",
    "GenerateUntil": "lmstack.eval.lm",
    "LocalLM": "lmstack.eval.local_lm",
    "OpenAICompletionsLM": "lmstack.eval.openai_lm",
    "Task": "lmstack.eval.task",
    "TaskDataMissing": "lmstack.eval.task",
    "register_task": "lmstack.eval.task",
    "get_task": "lmstack.eval.task",
    "list_tasks": "lmstack.eval.task",
    "data_dir": "lmstack.eval.task",
    "evaluate": "lmstack.eval.evaluator",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmstack.eval' has no attribute {name!r}")
