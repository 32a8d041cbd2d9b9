"""PerfTracker: what one evaluation run cost -- time, CPU, memory, tokens, FLOPs and energy.

The evaluator wraps every task in a tracker; HELM's efficiency axis and the report card read its summary.

- wall and CPU seconds (this process plus finished child processes, e.g. the code sandbox);
- peak resident memory of the phase: Linux lets us reset the kernel's high-water mark (VmHWM) by writing
  5 to /proc/self/clear_refs, so the peak is this phase's, not the whole process's; elsewhere we fall back
  to ru_maxrss (the process lifetime peak) and say so in `peak_mem_scope`;
- CUDA peak allocated memory when a GPU is in use;
- token counts, tokens/s and time to first token, from the deltas of the LM's `stats` counters;
- analytic forward FLOPs per token from the ModelConfig (Kaplan et al. 2020: 2 FLOPs per weight that
  touches the token, plus attention's QK^T and AV over the context, see model/counting.py), total FLOPs,
  FLOPs per query, and an energy estimate: total FLOPs x a configurable joules-per-FLOP, next to the
  measured CPU seconds x a configurable watts-per-core.

Usage:
    with PerfTracker(lm) as perf:
        run_the_task()
    print(perf.summary(n_queries=len(docs)))    # {"wall_s": ..., "tokens_per_s": ..., "total_flops": ...}
"""
from __future__ import annotations

import os
from pathlib import Path
import resource
import sys
import time

# Trackers currently inside their `with` block. Resetting the memory high-water mark for an inner tracker
# would erase the outer one's peak, so before each reset every active tracker banks the peak so far.
_ACTIVE: list["PerfTracker"] = []


def _hwm_kb() -> int | None:
    """The kernel's peak-RSS mark for this process (VmHWM, kB), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> int:
    # ru_maxrss is kB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True when the kernel allowed it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cuda():
    """torch.cuda when torch is already imported and a GPU was initialised; never imports torch itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _cpu_seconds() -> float:
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def flops_per_token(config, context: int) -> float:
    """Forward FLOPs for one token that attends to `context` earlier tokens (embeddings lookups are free).

    = 2 * (parameters a token is multiplied by: every block's active weights and the LM head)
      + 2 * 2 * n_layers * context * n_heads * head_dim   (QK^T scores and the weighted sum of V)."""
    # lazy: heavy (torch), which this module does not import at its top
    from lmstack.model.counting import model_stats

    return float(model_stats(config, context=max(1, int(context))).forward_flops_per_token)


class PerfTracker:
    """Measure a block of evaluation work. `lm` is any LM (its `stats` and `config` are optional)."""

    def __init__(self, lm=None, joules_per_flop: float = 1e-10, watts_per_core: float = 15.0):
        if joules_per_flop < 0:
            raise ValueError(f"joules_per_flop must be >= 0, got {joules_per_flop}")
        if watts_per_core < 0:
            raise ValueError(f"watts_per_core must be >= 0, got {watts_per_core}")
        self.lm = lm
        self.joules_per_flop = joules_per_flop
        """Energy per FLOP; 1e-10 J is the order of a CPU core doing fp32 matmuls (~10 GFLOP/J)."""
        self.watts_per_core = watts_per_core
        """Power drawn by one busy core, to turn CPU seconds into joules."""
        self._peak_kb = 0
        self._cuda_peak = 0
        self._done = False

    # ---- counters
    def _stats(self) -> dict:
        stats = getattr(self.lm, "stats", None) or {}
        return {"prompt_tokens": int(stats.get("prompt_tokens", 0)),
                "generated_tokens": int(stats.get("generated_tokens", 0)),
                "requests": int(stats.get("requests", 0)),
                "ttft_s": list(stats.get("ttft_s", []))}

    def _bank_peaks(self) -> None:
        hwm = _hwm_kb()
        self._peak_kb = max(self._peak_kb, hwm if hwm is not None else _maxrss_kb())
        cuda = _cuda()
        if cuda is not None:
            self._cuda_peak = max(self._cuda_peak, cuda.max_memory_allocated())

    def __enter__(self) -> "PerfTracker":
        for outer in _ACTIVE:
            outer._bank_peaks()
        self.mem_scope = "phase" if _hwm_kb() is not None and _reset_hwm() else "process"
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        _ACTIVE.append(self)
        self._start = self._stats()
        self._t0, self._c0 = time.perf_counter(), _cpu_seconds()
        self._done = False
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = _cpu_seconds() - self._c0
        self._bank_peaks()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        end = self._stats()
        self.prompt_tokens = end["prompt_tokens"] - self._start["prompt_tokens"]
        self.generated_tokens = end["generated_tokens"] - self._start["generated_tokens"]
        self.requests = end["requests"] - self._start["requests"]
        self.ttfts = end["ttft_s"][len(self._start["ttft_s"]):]
        self._done = True

    # ---- derived numbers
    def mean_context(self) -> float:
        """Average number of earlier tokens a processed token attends to.

        With causal attention the i-th token of a sequence sees i tokens, so over a request of L tokens the
        mean is about L/2; L is estimated as the tokens processed per request."""
        tokens = self.prompt_tokens + self.generated_tokens
        per_request = tokens / self.requests if self.requests else tokens
        return max(1.0, per_request / 2)

    def summary(self, n_queries: int) -> dict:
        """The tracker's numbers as a JSON-ready dict (call after the `with` block)."""
        if not self._done:
            raise RuntimeError("PerfTracker.summary() needs a finished `with PerfTracker(...)` block")
        tokens = self.prompt_tokens + self.generated_tokens
        out = {
            "wall_s": round(self.wall_s, 4), "cpu_s": round(self.cpu_s, 4),
            "peak_mem_mb": round(self._peak_kb / 1024, 1), "peak_mem_scope": self.mem_scope,
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "requests": self.requests, "n_queries": n_queries,
            "tokens_per_s": round(tokens / self.wall_s, 2) if self.wall_s > 0 else None,
            "generated_tokens_per_s": (round(self.generated_tokens / self.wall_s, 2)
                                       if self.wall_s > 0 and self.generated_tokens else None),
            "ttft_s": round(sum(self.ttfts) / len(self.ttfts), 5) if self.ttfts else None,
            "energy_cpu_j": round(self.cpu_s * self.watts_per_core, 3),
        }
        if self._cuda_peak:
            out["cuda_peak_mem_mb"] = round(self._cuda_peak / 2**20, 1)
        config = getattr(self.lm, "config", None)
        if config is not None and hasattr(config, "n_layers"):
            fpt = flops_per_token(config, round(self.mean_context()))
            total = fpt * tokens
            out.update(flops_per_token=fpt, total_flops=total,
                       flops_per_query=total / n_queries if n_queries else None,
                       energy_j=total * self.joules_per_flop)
        else:  # a remote endpoint: we cannot see the model, so no analytic FLOPs
            out.update(flops_per_token=None, total_flops=None, flops_per_query=None, energy_j=None)
        return out
