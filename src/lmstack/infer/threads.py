"""CPU thread policy for the engine: many threads for big matmuls, one thread for everything small.

With OpenMP, every parallel op wakes and joins a team of threads. For big GEMMs that pays off; for a
softmax over a few rows, a top-k or a tiny model's attention it costs more than the op, and when
another process keeps a core busy the join can stall for milliseconds (measured on this 2-core
machine under load: a 3x4 softmax took 14 ms on 2 threads and 1.8 us on 1). So the engine runs its
step on one thread and hands the model forward the caller's thread count only when its matmuls are
big enough to gain from it: d_model x d_ff x tokens (one MLP matmul) of at least MIN_PARALLEL_WORK.
A ~123M model decoding one token qualifies (768 x 2048); a small model only for longer prompt chunks,
so a 6M-parameter model verifying a 5-token speculative window stays on one thread.
Both settings are restored afterwards.

Usage:
    with engine_threads():            # inside: 1 thread; threads_for() may raise it for a forward
        with threads_for(work=d_model * d_ff * tokens):
            logits = model(...)
"""
from __future__ import annotations

import contextlib
import threading

import torch

MIN_PARALLEL_WORK = 1 << 20
"""d_model x d_ff x tokens below which a forward runs on one thread."""

_local = threading.local()


def _budget() -> int:
    return getattr(_local, "budget", None) or torch.get_num_threads()


@contextlib.contextmanager
def engine_threads():
    """Remember the caller's thread count as the budget, and run on one thread inside."""
    before = torch.get_num_threads()
    outer = getattr(_local, "budget", None)
    _local.budget = outer or before
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _local.budget = outer
        torch.set_num_threads(before)


@contextlib.contextmanager
def threads_for(work: int):
    """Use the full thread budget for big work, one thread otherwise."""
    before = torch.get_num_threads()
    want = _budget() if work >= MIN_PARALLEL_WORK else 1
    if want != before:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if want != before:
            torch.set_num_threads(before)
