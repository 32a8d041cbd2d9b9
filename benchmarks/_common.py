"""Helpers every benchmark uses: timing, peak memory, and writing results/<name>.json in one shape.

Each result: {"benchmark", "metric", "higher_is_better", "ours", "baseline": {"name", "value"},
"ratio", "goal", "config", "date"}, where ratio > 1 always means we are ahead.

Usage:
    from _common import result, write_result, timeit
    secs = timeit(lambda: f(x), repeat=5)
    write_result("attention", [result("attention", "seconds", False, ours, "naive", base, goal=1.0)])
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def result(name: str, metric: str, higher_is_better: bool, ours: float, baseline_name: str, baseline: float,
           goal: float | None = None, **config: Any) -> dict:
    if higher_is_better:
        ratio = ours / baseline if baseline else float("inf")
    else:
        ratio = baseline / ours if ours else float("inf")
    return {"benchmark": name, "metric": metric, "higher_is_better": higher_is_better, "ours": ours,
            "baseline": {"name": baseline_name, "value": baseline}, "ratio": round(ratio, 4), "goal": goal,
            "config": config, "date": datetime.date.today().isoformat()}


def write_result(name: str, results: dict | list[dict]) -> Path:
    """Write benchmarks/results/<name>.json atomically and print each ratio."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    for r in results if isinstance(results, list) else [results]:
        goal = f" (goal {r['goal']})" if r.get("goal") is not None else ""
        print(f"{r['benchmark']}: {r['metric']} ours={r['ours']:.4g} {r['baseline']['name']}="
              f"{r['baseline']['value']:.4g} ratio={r['ratio']:.3f}{goal}")
    print(f"wrote {path}")
    return path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs), so peaks are per phase."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset_peak_rss() (VmHWM), in MB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def peak_and_seconds(step: Callable[[], Any]) -> dict:
    """Run `step` twice in a fresh process phase: {"seconds": the faster run, "peak_mb": the first run's peak
    resident memory above where it started} (the second run reuses the allocator's pages, so only the first
    shows the peak)."""
    reset_peak_rss()
    base = rss_mb()
    start = time.perf_counter()
    step()
    times = [time.perf_counter() - start]
    peak = peak_rss_mb() - base
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_mb": peak}


def attention_worker(ours: Callable, kind: str, mode: str, t: int, batch: int, heads: int, head_dim: int) -> dict:
    """A fresh-process measurement of causal attention over random q, k, v (batch, heads, t, head_dim):
    `ours(q, k, v)`, or torch SDPA (is_causal, the path a user runs) when kind == 'sdpa'; forward only, or
    forward + backward when mode == 'fwd_bwd'. peak_and_seconds of that (lsh_attention.py, routing_attention.py)."""
    import torch  # lazy: most benchmarks importing _common measure servers or files and never load torch here

    from lmstack.model.backends import sdpa_attention  # lazy: as torch above
    from lmstack.model.masks import AttentionMask  # lazy: as torch above

    torch.set_num_threads(1)
    torch.manual_seed(0)
    grad = mode == "fwd_bwd"
    q, k, v = (torch.randn(batch, heads, t, head_dim, requires_grad=grad) for _ in range(3))
    if kind == "sdpa":
        mask = AttentionMask(q_pos=torch.arange(t), k_pos=torch.arange(t), causal=True)
        fn = lambda: sdpa_attention(q, k, v, mask, head_dim ** -0.5)  # plain causal -> is_causal=True
    else:
        fn = lambda: ours(q, k, v)

    def step():
        if grad:
            fn().sum().backward()
        else:
            with torch.no_grad():
                fn()

    return peak_and_seconds(step)


# ---- servers -------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (benchmarks' servers bind to loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float = 180.0, log_path: Path | None = None) -> None:
    """Wait until the server process `proc` answers GET /health on `port` with 200; raise (and kill it) when it
    exits or does not come up within timeout_s."""
    import httpx  # lazy: only the server benchmarks need httpx

    where = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}){where}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not come up in {timeout_s:.0f} s{where}")
