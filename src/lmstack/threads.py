"""How many CPU threads torch uses, for every stage: one owner for the setting, and a collapse warning.

torch's default is one thread per core. On a machine shared with other busy processes that default
oversubscribes the cores: OpenMP threads spin waiting for each other while the kernel schedules someone
else, and a 2-core machine with one other busy process ran 18 training steps in 15 s with the default
against 369 with one thread. So every stage takes `threads` (0 = auto) and resolves it here:

    auto = the cores this process may run on (sched_getaffinity), minus the cores other processes keep
           busy right now (sampled from /proc/stat for 0.2 s; the 1-minute load average where there is
           no /proc), shared among torchrun's local processes, at least 1.

A quiet 2-core laptop gets both cores (one thread would halve the speedrun's pretraining); with one other
busy process it gets one. The sample is instantaneous on purpose: the load average lags by a minute, so it
both misses a competitor that just started and still counts one that just finished.

An explicit number is used as given. `ThroughputWatch` warns once when steps become many times slower
than the first ones (the symptom of oversubscription that starts after launch).

Usage:
    from lmstack.threads import set_threads, ThroughputWatch
    n = set_threads(cfg.threads)             # 0 = auto; returns the number in use
    watch = ThroughputWatch(); watch.step(seconds_of_this_step)   # warns once on a collapse
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

from lmstack.errors import LmstackError

THREADS_HELP = ("CPU threads for torch: 0 = auto (the cores this process may use, minus the cores other "
                "processes keep busy right now; at least 1); N = exactly N")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_jiffies() -> tuple[int, int]:
    """(total, idle) CPU time over all cores since boot, from the aggregate line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # user..steal; idle + iowait count as free


def busy_cores(sample_seconds: float = 0.2) -> float:
    """Cores other processes keep busy now: busy share of a short /proc/stat sample x the machine's cores
    (this process sleeps through the sample, so it is not counted); else the 1-minute load average; else 0."""
    try:
        total0, idle0 = _cpu_jiffies()
        time.sleep(sample_seconds)
        total1, idle1 = _cpu_jiffies()
        if total1 > total0:
            return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / (total1 - total0))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """The default thread count: the cores that others are not using; at least 1."""
    cores = available_cores() if cores is None else cores
    load = busy_cores() if load is None else load
    free = cores - int(round(load))
    # under torchrun, the processes on this machine share its cores
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(cores, free) // local)


_AUTO: int | None = None  # the first auto decision of this process (see resolve_threads)


def resolve_threads(threads: int | None) -> int:
    """0 or None = auto; N >= 1 = N; anything else is an error that names the flag.

    Auto is decided once per process: a later stage of the same run (the speedrun's SFT after its
    pretraining) would otherwise read its own earlier work in the load average and starve itself."""
    global _AUTO
    if threads is None or threads == 0:
        if _AUTO is None:
            _AUTO = auto_threads()
        return _AUTO
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise LmstackError(f"threads={threads!r} is not allowed; use 0 (auto) or an integer >= 1")
    return threads


def set_threads(threads: int | None = 0, log: Callable[[str], None] | None = None) -> int:
    """Resolve `threads` and set torch's intra-op thread count; return the number in use."""
    # lazy: heavy (torch), which this module does not import at its top
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if log is not None:
        how = "auto" if not threads else "set"
        log(f"threads: {n} ({how}; {available_cores()} cores, load {busy_cores():.1f})")
    return n


class ThroughputWatch:
    """Warns once when the median of the last `window` step times exceeds `factor` times the median of
    the first `window` steps (the very first step is skipped: it pays for warm-up)."""

    def __init__(self, factor: float = 5.0, window: int = 5, warn: Callable[[str], None] | None = None,
                 hint: str = "--threads 1"):
        self.factor, self.window, self.hint = factor, window, hint
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.times: list[float] = []
        self.reference: float | None = None
        self.warned = False

    def step(self, seconds: float) -> bool:
        """Record one step's duration (or its duration per unit of work); True when this raised the warning."""
        self.times.append(seconds)
        w = self.window
        if self.reference is None:
            if len(self.times) >= w + 1:
                self.reference = statistics.median(self.times[1:w + 1])
            return False
        if self.warned or len(self.times) < 2 * w + 1 or self.reference <= 0:
            return False
        recent = statistics.median(self.times[-w:])
        if recent > self.factor * self.reference:
            # lazy: heavy (torch), which this module does not import at its top
            import torch

            self.warned = True
            self.warn(f"lmstack: warning: steps now run {recent / self.reference:.1f}x slower than the first ones "
                      f"(median of the last {w} against the first {w}) with {torch.get_num_threads()} threads; the "
                      f"CPU is probably shared or oversubscribed: try {self.hint}")
            return True
        return False
