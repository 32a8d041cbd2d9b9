"""Ordered, memory-bounded parallel map over batches with a multiprocessing Pool.

`Pool.imap` reads its whole input eagerly, so a big corpus would pile up in the task queue. We keep
at most `max_pending` batches in flight and yield results in input order, so memory stays flat and
the output is the same whatever the worker count. With workers <= 1 everything runs in this
process (the initializer too): what tests use, and what a 1-core machine needs.

Workers receive only picklable arguments (plain dicts, lists, dataclass configs, paths); anything
heavy (tokenizers, classifiers, n-gram indexes) is built once per worker by the initializer.

Usage:
    from lmstack.data.parallel import parallel_map
    for out in parallel_map(work, batches, workers=2, initializer=setup, initargs=(cfg,)):
        ...
"""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
from typing import Any, Callable, Iterable, Iterator


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1,
                 initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 max_pending: int | None = None) -> Iterator[Any]:
    """Yield fn(item) for each item, in order, using `workers` processes (inline when <= 1)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    max_pending = max_pending or 2 * workers
    with mp.get_context().Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
