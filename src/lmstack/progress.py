"""The progress bar of every training loop: its total and ETA follow whichever limit ends the run first.

A loop that stops at `steps` steps or after `max_seconds`, whichever comes first, should not show
"280/2000, ETA 43 min" when the clock will stop it at about step 300 in 20 s. After each step the bar
forecasts, from the measured step rate, the step at which the run will end,

    final = min(steps, done + ceil(rate * seconds_left))      (seconds_left = max_seconds - elapsed)

and shows that as its total, so tqdm's ETA is the time to the nearer limit; the postfix says which
limit ("ends by time" / "ends by steps"). Each step's duration also feeds a ThroughputWatch, which warns
once when steps become many times slower than the first ones (lmstack.threads).

The bar keeps tqdm's interface (update, set_postfix, close), so loops that used tqdm switch by
changing one line. Pass `clock` to test the arithmetic with a fake clock.

Usage:
    from lmstack.progress import BudgetBar
    bar = BudgetBar(cfg.steps, max_seconds=cfg.max_seconds, desc="train", enabled=cfg.progress)
    for step in ...:
        ...
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

from tqdm import tqdm

from lmstack.threads import ThroughputWatch


def forecast(done: int, steps: int, elapsed: float, max_seconds: float, initial: int = 0) -> tuple[int, float, str]:
    """(final step, seconds left, "time" or "steps"): where a run capped by `steps` and `max_seconds`
    (0 = no time cap) will end, given `done` steps after `elapsed` seconds (`initial` of them were done
    before the clock started, e.g. on resume). Before the first timed step the rate is unknown:
    (steps, nan, "steps")."""
    timed = done - initial
    if timed <= 0 or elapsed <= 0:
        return steps, math.nan, "steps"
    rate = timed / elapsed
    to_steps = max(0, steps - done) / rate
    if not max_seconds or max_seconds <= 0:
        return steps, to_steps, "steps"
    left = max(0.0, max_seconds - elapsed)
    if left >= to_steps:
        return steps, to_steps, "steps"
    # the loop checks the clock before each step, so the step under way when time runs out still finishes
    return min(steps, done + math.ceil(rate * left)), left, "time"


class BudgetBar:
    """tqdm-compatible bar for a loop bounded by steps and (optionally) a wall-clock budget."""

    def __init__(self, steps: int, max_seconds: float = 0.0, desc: str = "", initial: int = 0,
                 enabled: bool = True, clock: Callable[[], float] = time.perf_counter,
                 watch: ThroughputWatch | None = None, hint: str = "--threads 1"):
        self.steps, self.max_seconds, self.initial = int(steps), float(max_seconds or 0.0), int(initial)
        self.clock = clock
        self.start = self.last = clock()
        self.n = self.initial
        self.total, self.eta, self.ends_by = self.steps, math.nan, "steps"
        self.watch = watch if watch is not None else ThroughputWatch(warn=self.write, hint=hint)
        self._bar = None
        self._postfix: dict[str, Any] = {}
        if enabled:
            self._bar = tqdm(total=self.steps, initial=self.initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, work: float | None = None) -> None:
        """n steps done; `work` (e.g. tokens) lets the collapse watch compare time per unit of work, so a
        loop whose steps grow on purpose (adaptive batch size) is not mistaken for an oversubscribed one."""
        now = self.clock()
        if n:
            self.watch.step((now - self.last) / (work if work else n))
        self.last = now
        self.n += n
        self.total, self.eta, self.ends_by = forecast(self.n, self.steps, now - self.start, self.max_seconds,
                                                      self.initial)
        if self._bar is not None:
            if self._bar.total != self.total:
                self._bar.total = self.total
            self._bar.update(n)
            if self.max_seconds:
                self._show_postfix()

    def set_postfix(self, **kwargs: Any) -> None:
        self._postfix = kwargs
        self._show_postfix()

    def _show_postfix(self) -> None:
        if self._bar is None:
            return
        extra = {"ends_by": self.ends_by} if self.max_seconds else {}
        self._bar.set_postfix(**self._postfix, **extra)

    def write(self, msg: str) -> None:
        """Print a line above the bar (or to stderr without one)."""

        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.total = self.n  # the run ended here, whichever limit stopped it
            self._bar.refresh()
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "BudgetBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
