"""evaluate(): run tasks against an LM and collect metrics, standard errors, chance levels, perf and per-item logs.

For each task: load its documents (a missing data file skips the task with a message, the run goes on),
build each item's prompt (few-shot, raw or chat template, optional HELM perturbations), collect every
item's requests, send them to the LM grouped by type in chunks (so the LM can batch by length across
items, and a progress bar can move), hand the answers back to the task for per-item metrics, then
aggregate with a seeded bootstrap standard error. Multiple-choice tasks also get ECE (calibration).

Usage:
    from lmstack.eval import LocalLM, evaluate
    out = evaluate(LocalLM("runs/tiny"), ["arc_easy"], num_fewshot=0, limit=200, out_dir="runs/tiny/eval")
    out["results"]["arc_easy"]["metrics"]    # {"acc": 0.31, "acc_stderr": 0.03, "acc_norm": ..., "ece": ...}
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict
import inspect
import json
import math
from pathlib import Path
import time
from typing import Any, Callable

from tqdm.auto import tqdm

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.eval import metrics as M
from lmstack.eval.lm import GenerateUntil, Loglikelihood, Rolling
from lmstack.eval.task import Task, TaskDataMissing, get_task

# Requests per LM call: big enough for length-sorted batching, small enough for a lively progress bar.
CHUNK = {"loglikelihood": 256, "rolling": 32, "generate": 64}
LOWER_IS_BETTER = {"ece", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def _tracker(lm):
    """The perf tracker around a task run, or a no-op until lmstack.eval.perf exists."""
    try:
        # lazy: guarded: the except ImportError below falls back to no tracker
        from lmstack.eval.perf import PerfTracker
    except ImportError:
        return None
    return PerfTracker(lm)


def _kind(req) -> str:
    if isinstance(req, Loglikelihood):
        return "loglikelihood"
    if isinstance(req, Rolling):
        return "rolling"
    if isinstance(req, GenerateUntil):
        return "generate"
    raise LmstackError(f"a task produced a request of unknown type {type(req).__name__}")


def run_requests(lm, requests: list, bar=None) -> list:
    """Answer a list of Request objects, grouped by type and chunked; answers come back in request order."""
    answers: list[Any] = [None] * len(requests)
    by_kind: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        by_kind.setdefault(_kind(req), []).append(i)
    for kind, idx in by_kind.items():
        if kind == "loglikelihood":
            # Longest first across the whole task (characters stand in for tokens), so each chunk holds
            # requests of similar length and the LM's batches carry little padding, as with one big call.
            idx = sorted(idx, key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
        step = CHUNK[kind]
        for start in range(0, len(idx), step):
            part = idx[start:start + step]
            reqs = [requests[i] for i in part]
            if kind == "loglikelihood":
                out = lm.loglikelihood([(r.context, r.continuation) for r in reqs])
            elif kind == "rolling":
                out = lm.loglikelihood_rolling([r.text for r in reqs])
            else:
                out = lm.generate_until([(r.context, r.args) for r in reqs])
            if len(out) != len(reqs):
                raise LmstackError(f"the LM answered {len(out)} of {len(reqs)} {kind} requests")
            for i, a in zip(part, out):
                answers[i] = a
            if bar is not None:
                bar.update(len(part))
    return answers


def _aggregate(task: Task, per_item: list[dict], mc_items: list, bootstrap_iters: int, seed: int) -> dict:
    aggs = task.aggregation()
    metrics: dict[str, float] = {}
    names = list(dict.fromkeys(k for item in per_item for k in item))
    for name in names:
        values = [item[name] for item in per_item if name in item]
        fn = aggs.get(name, M.mean)
        metrics[name] = fn(values)
        if bootstrap_iters > 0:
            metrics[f"{name}_stderr"] = M.bootstrap_stderr(fn, values, iters=bootstrap_iters, seed=seed)
    if mc_items and "ece" not in metrics:  # tasks that compute ECE themselves keep theirs
        def ece_of(items):
            return M.ece([lls for lls, _ in items], [g for _, g in items])
        metrics["ece"] = ece_of(mc_items)
        if bootstrap_iters > 0:
            metrics["ece_stderr"] = M.bootstrap_stderr(ece_of, mc_items, iters=bootstrap_iters, seed=seed)
    return metrics


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    if isinstance(x, (str, int, bool)) or x is None or isinstance(x, float):
        return x
    return str(x)


def evaluate_task(lm, task: Task, num_fewshot: int = 0, limit: int | None = None, seed: int = 1234,
                  chat: Callable[[list[dict]], str] | None = None, bootstrap_iters: int = 1000,
                  prompt_transform: Callable[[str], str] | None = None,
                  doc_transform: Callable[[dict], dict] | None = None, progress: bool = True
                  ) -> tuple[dict, list[dict]]:
    """(result entry, per-item samples) for one task; TaskDataMissing propagates to the caller."""

    docs = task.cached_docs(task.eval_split)
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise TaskDataMissing(f"task {task.name!r}: split {task.eval_split!r} has no documents")
    items = []  # (doc, prompt, requests)
    takes_exclude = "exclude" in inspect.signature(task.fewshot_context).parameters
    for doc in docs:
        shown = doc_transform(dict(doc)) if doc_transform else doc
        # A transformed doc is a copy: name the original so it can't be drawn as its own few-shot example
        # (only to tasks whose fewshot_context takes `exclude`; an override may predate it).
        extra = {"exclude": doc} if shown is not doc and takes_exclude else {}
        prompt = task.fewshot_context(shown, num_fewshot, seed, chat=chat, **extra)
        if prompt_transform is not None:
            prompt = prompt_transform(prompt)
        items.append((shown, prompt, task.requests(shown, prompt)))
    flat = [r for _, _, reqs in items for r in reqs]
    tracker = _tracker(lm)
    with tqdm(total=len(flat), desc=task.name, unit="req", disable=not progress, dynamic_ncols=True) as bar:
        with tracker if tracker is not None else contextlib.nullcontext():
            start = time.perf_counter()
            answers = run_requests(lm, flat, bar)
            wall = time.perf_counter() - start
    per_item, samples, mc_items, pos = [], [], [], 0
    for i, (doc, prompt, reqs) in enumerate(items):
        responses = answers[pos:pos + len(reqs)]
        pos += len(reqs)
        values = task.process_results(doc, responses)
        per_item.append(values)
        if task.output_type == "multiple_choice":
            gold = task.doc_to_target(doc)
            if isinstance(gold, int) and len(responses) == len(task.doc_to_choice(doc)):
                mc_items.append(([float(r[0]) for r in responses], gold))
        samples.append({"doc_id": i, "doc": doc, "prompt": prompt, "target": _safe_target(task, doc),
                        "requests": [{"type": _kind(r), **asdict(r)} for r in reqs],
                        "responses": responses, "metrics": values})
    metrics = _aggregate(task, per_item, mc_items, bootstrap_iters, seed)
    higher = dict(task.higher_is_better())
    for name in metrics:
        if not name.endswith("_stderr"):
            higher.setdefault(name, name not in LOWER_IS_BETTER)
    chances = [task.chance(d) for d, _, _ in items]
    entry = {"metrics": metrics, "n": len(items), "num_fewshot": num_fewshot,
             "chance": None if any(c is None for c in chances) else M.mean(chances),
             "higher_is_better": higher,
             "perf": tracker.summary(len(items)) if tracker is not None else {"wall_s": wall}}
    return entry, samples


def _safe_target(task: Task, doc: dict) -> Any:
    try:
        return task.doc_to_target(doc)
    except (NotImplementedError, KeyError, IndexError, TypeError, ValueError):
        return None


def evaluate(lm, tasks: list[str | Task], num_fewshot: int | None = 0, limit: int | None = None, seed: int = 1234,
             chat_template: bool = False, bootstrap_iters: int = 1000, out_dir: str | Path | None = None,
             prompt_transform: Callable[[str], str] | None = None,
             doc_transform: Callable[[dict], dict] | None = None, progress: bool = True) -> dict:
    """Evaluate `lm` on `tasks` (names or Task objects); see the module docstring for the result's shape."""
    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise LmstackError(f"num_fewshot must be an integer >= 0 (or None: each task's own), got {num_fewshot!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise LmstackError(f"limit must be a positive integer or None, got {limit!r}")
    # Resolve every name first, so a typo fails before any work is done.
    resolved = [get_task(t) if isinstance(t, str) else t for t in tasks]
    chat = None
    if chat_template or getattr(lm, "chat_template", False):
        chat = getattr(lm, "render_chat", None)
        if chat is None:
            raise LmstackError(f"{type(lm).__name__} has no chat template (render_chat); run without chat_template")
    out_path = Path(out_dir) if out_dir is not None else None
    config = {"tasks": [t.name for t in resolved], "num_fewshot": num_fewshot, "limit": limit, "seed": seed,
              "chat_template": chat is not None, "bootstrap_iters": bootstrap_iters,
              "model": getattr(lm, "name", None) or type(lm).__name__,
              "max_length": getattr(lm, "max_length", None)}
    output: dict = {"results": {}, "config": config}
    for task in resolved:
        try:
            # None: the task's own default (an lm-eval YAML's num_fewshot), else zero.
            shots = num_fewshot if num_fewshot is not None else int(getattr(task, "num_fewshot", 0) or 0)
            entry, samples = evaluate_task(lm, task, shots, limit, seed, chat, bootstrap_iters,
                                           prompt_transform, doc_transform, progress)
        except TaskDataMissing as e:
            print(f"lmstack eval: skipping {task.name}: {e}")
            output["results"][task.name] = {"skipped": str(e)}
            samples = None
        else:
            output["results"][task.name] = entry
        if out_path is not None:
            # Written after every task, so an interrupted run keeps what it finished.
            if samples is not None:
                lines = "".join(json.dumps(_jsonable(s), ensure_ascii=False) + "\n" for s in samples)
                atomic_write_text(out_path / f"samples_{task.name}.jsonl", lines)
            atomic_write_text(out_path / "results.json", json.dumps(_jsonable(output), indent=2))
    return output
