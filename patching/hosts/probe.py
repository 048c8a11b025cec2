"""Serving probes: the SLO probe straight at a host, the soak's GPU-memory sampling, and a bounded
traffic generator for live load through a load balancer.

Everything here speaks plain HTTP to an OpenAI-compatible endpoint (`/v1/chat/completions`,
`/metrics`); the figures are returned, and the runner judges them against the policy.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from patching.hosts.facts import parse_prometheus

GPU_MEMORY_METRIC = "DCGM_FI_DEV_FB_USED"  # MiB per GPU, as NVIDIA's DCGM exporter names it


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats
    return ordered[int(rank) - 1]


def chat_request(base_url: str, model: str | None, timeout: float) -> tuple[bool, float, str]:
    """One small completion: (ok, latency in ms, detail on failure)."""
    body = json.dumps({"model": model or "default", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            ok, detail = resp.status == 200, "" if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        ok, detail = False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        ok, detail = False, type(exc).__name__ + (f": {exc.reason}" if hasattr(exc, "reason") else "")
    return ok, (time.monotonic() - started) * 1000, detail


@dataclass
class ProbeFigures:
    """What one SLO probe measured: requests, errors, P50/P99 latency, the first error."""

    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    first_error: str = ""

    @property
    def error_rate(self) -> float:
        """Failed requests as a fraction of those sent."""
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict:
        """The figures (rounded) as journal and report data."""
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p50_ms": round(self.p50_ms, 1), "p99_ms": round(self.p99_ms, 1)}


def slo_probe(base_url: str, model: str | None, warmup: int, requests: int, timeout: float) -> ProbeFigures:
    """Warm-up requests (not measured), then `requests` sequential ones, measured."""
    for _ in range(warmup):
        chat_request(base_url, model, timeout)
    latencies, errors, first_error = [], 0, ""
    for _ in range(requests):
        ok, ms, detail = chat_request(base_url, model, timeout)
        latencies.append(ms)
        if not ok:
            errors += 1
            first_error = first_error or detail
    return ProbeFigures(requests, errors, percentile(latencies, 50), percentile(latencies, 99), first_error)


def gpu_memory_mib(base_url: str, timeout: float = 10) -> float:
    """The most GPU memory any one GPU of the host uses, from the serving endpoint's /metrics."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:
        metrics = parse_prometheus(resp.read().decode())
    samples = metrics.find(GPU_MEMORY_METRIC)
    if not samples:
        raise ValueError(f"{base_url}/metrics has no {GPU_MEMORY_METRIC}")
    return max(s.value for s in samples)


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (monotonic seconds, MiB) points, in MiB per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (m - mean_m) for t, m in points)
    return cov / var * 3600


@dataclass
class SoakFigures:
    """What a soak measured: probes, worst P99 and error rate, GPU memory samples and their growth."""

    samples: int
    p99_ms: float
    error_rate: float
    gpu_memory_slope_mib_per_hour: float
    memory_mib: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The figures (rounded) as journal and report data."""
        return {"samples": self.samples, "p99_ms": round(self.p99_ms, 1), "error_rate": round(self.error_rate, 4),
                "gpu_memory_slope_mib_per_hour": round(self.gpu_memory_slope_mib_per_hour, 1),
                "gpu_memory_mib": self.memory_mib}


def soak(base_url: str, model: str | None, duration_s: float, interval_s: float, requests_per_probe: int,
         timeout: float, stop: Callable[[], bool] = lambda: False) -> SoakFigures:
    """Probe every `interval_s` for `duration_s` and sample GPU memory each time (at least twice)."""
    started = time.monotonic()
    points: list[tuple[float, float]] = []
    worst_p99, worst_rate = 0.0, 0.0
    while True:
        figures = slo_probe(base_url, model, 0, requests_per_probe, timeout)
        worst_p99, worst_rate = max(worst_p99, figures.p99_ms), max(worst_rate, figures.error_rate)
        points.append((time.monotonic(), gpu_memory_mib(base_url, timeout)))
        elapsed = time.monotonic() - started
        if stop() or (elapsed >= duration_s and len(points) >= 2):
            break
        if elapsed < duration_s:
            time.sleep(min(interval_s, duration_s - elapsed))
    return SoakFigures(len(points), worst_p99, worst_rate, slope_per_hour(points), [m for _, m in points])


@dataclass
class TrafficFigures:
    """Live traffic sent through the load balancer during a rollout: counts, latencies, failures."""

    sent: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def p99_ms(self) -> float:
        """P99 latency of the requests sent so far."""
        return percentile(self.latencies_ms, 99)

    def as_dict(self) -> dict:
        """The figures (rounded) as journal and report data."""
        return {"sent": self.sent, "failed": self.failed, "p99_ms": round(self.p99_ms, 1), "failures": self.failures}


class TrafficGenerator:
    """Live load through a load balancer: `concurrency` clients, bounded in requests and in time."""

    def __init__(self, urls: list[str], model_of: Callable[[str], str | None], concurrency: int = 2,
                 max_requests: int = 100_000, max_seconds: float = 1800, timeout: float = 30):
        self.urls, self.model_of = urls, model_of
        self.concurrency, self.max_requests, self.max_seconds, self.timeout = (
            concurrency, max_requests, max_seconds, timeout)
        self.figures = TrafficFigures()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> TrafficGenerator:
        """Start the clients; they stop by themselves after `max_requests` or `max_seconds`."""
        deadline = time.monotonic() + self.max_seconds
        for i in range(self.concurrency):
            t = threading.Thread(target=self._client, args=(i, deadline), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _client(self, index: int, deadline: float) -> None:
        n = index
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self.figures.sent >= self.max_requests:
                    return
                self.figures.sent += 1
            url = self.urls[n % len(self.urls)]
            n += 1
            ok, ms, detail = chat_request(url, self.model_of(url), self.timeout)
            with self._lock:
                self.figures.latencies_ms.append(ms)
                if not ok:
                    self.figures.failed += 1
                    self.figures.failures[detail] = self.figures.failures.get(detail, 0) + 1

    def stop(self) -> TrafficFigures:
        """Stop the clients and return what they measured."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)
        return self.figures
