"""Prometheus metrics in the text exposition format (version 0.0.4), written without a client library.

Three kinds are enough for a server: a Counter only goes up, a Gauge is read at scrape time, and a
Histogram counts observations into cumulative `le` buckets plus a sum and a count. ServerMetrics holds
the server's own figures (requests, prompt/generation tokens, time to first token, latency) and reads
the engine's live state (running/waiting sequences, KV blocks used/free, prefix-cache hits) when
/metrics is scraped, so a gauge is never stale.

Usage:
    m = ServerMetrics(model_name="tiny")
    m.requests.inc(route="/v1/completions", status="200")
    m.ttft.observe(0.042)
    text = m.render(engine_stats={"running": 1, "waiting": 0, "num_blocks_total": 64, "num_blocks_free": 60})
"""
from __future__ import annotations

import math
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count; the exposed name gets the conventional `_total` suffix."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        super().__init__(name, help, labelnames)
        self.values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up (got {amount})")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def header(self) -> list[str]:
        # The classic text format names the family after its samples: HELP/TYPE carry the _total name too.
        return [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total {self.kind}"]

    def get(self, **labels) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}_total{_labels(self.labelnames, k)} {_number(v)}" for k, v in self.values.items()]


class Gauge(_Metric):
    """A value that goes up and down; `read` (if given) is called at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float] | None = None):
        super().__init__(name, help)
        self.value, self.read = 0.0, read

    def set(self, value: float) -> None:
        self.value = float(value)

    def lines(self) -> list[str]:
        if self.read is not None:
            self.value = float(self.read())
        return [f"{self.name} {_number(self.value)}"]


class Histogram(_Metric):
    """Observations counted into cumulative buckets (`le` = less than or equal), plus _sum and _count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        super().__init__(name, help)
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"histogram {self.name}: buckets must be strictly increasing, got {buckets}")
        self.buckets = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out, running = [], 0
        for upper, c in zip(self.buckets, self.counts):
            running += c  # exposition buckets are cumulative
            out.append(f'{self.name}_bucket{{le="{_number(upper)}"}} {running}')
        out += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Every metric the server exports. Engine gauges come from the `engine_stats` dict given to render()."""

    # engine stats key -> (metric name, help)
    ENGINE_GAUGES = {
        "running": ("lmstack_num_requests_running", "Sequences in the engine's running batch."),
        "waiting": ("lmstack_num_requests_waiting", "Sequences waiting to be scheduled."),
        "num_blocks_total": ("lmstack_kv_blocks_total", "KV-cache blocks in the pool."),
        "num_blocks_free": ("lmstack_kv_blocks_free", "KV-cache blocks not owned by any sequence."),
        "num_blocks_used": ("lmstack_kv_blocks_used", "KV-cache blocks owned by live sequences."),
        "prefix_cache_hit_tokens": ("lmstack_prefix_cache_hit_tokens", "Prompt tokens served from the prefix "
                                    "cache since start (engine counter)."),
        "prefill_tokens": ("lmstack_prefill_tokens", "Prompt tokens the engine actually computed since start "
                           "(engine counter)."),
    }

    def __init__(self, model_name: str = "model"):
        self.model_name = model_name
        self.requests = Counter("lmstack_requests", "HTTP requests answered, by route and status code.",
                                ("route", "status"))
        self.prompt_tokens = Counter("lmstack_prompt_tokens", "Prompt tokens received in generation requests.")
        self.generation_tokens = Counter("lmstack_generation_tokens", "Tokens generated for clients.")
        self.aborted = Counter("lmstack_requests_aborted", "Generation requests cancelled by a client disconnect.")
        self.rejected = Counter("lmstack_requests_rejected", "Requests refused before generation, by reason.",
                                ("reason",))
        self.ttft = Histogram("lmstack_time_to_first_token_seconds",
                              "Seconds from receiving a request to its first generated token.", LATENCY_BUCKETS)
        self.e2e = Histogram("lmstack_request_latency_seconds",
                             "Seconds from receiving a generation request to its last token.", LATENCY_BUCKETS)
        self.in_flight = Gauge("lmstack_requests_in_flight", "Engine requests (one per prompt) the server is working on.")

    def render(self, engine_stats: dict | None = None) -> str:
        metrics: list = [self.requests, self.prompt_tokens, self.generation_tokens, self.aborted, self.rejected,
                         self.ttft, self.e2e, self.in_flight]
        stats = dict(engine_stats or {})
        if "num_blocks_used" not in stats and "num_blocks_total" in stats and "num_blocks_free" in stats:
            stats["num_blocks_used"] = stats["num_blocks_total"] - stats["num_blocks_free"]
        for key, (name, help) in self.ENGINE_GAUGES.items():
            if isinstance(stats.get(key), (int, float)):
                g = Gauge(name, help)
                g.set(stats[key])
                metrics.append(g)
        lines = []
        for m in metrics:
            lines += m.header() + m.lines()
        return "\n".join(lines) + "\n"
