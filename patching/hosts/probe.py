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
from typing import Any

from patching.hosts.facts import parse_prometheus

GPU_MEMORY_METRIC = "DCGM_FI_DEV_FB_USED"  # MiB per GPU, as NVIDIA's DCGM exporter names it


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats
    return ordered[int(rank) - 1]


def time_left(deadline: float | None, timeout: float) -> float:
    """`timeout`, cut to what is left before `deadline` (a time.monotonic() value; None: no deadline)."""
    if deadline is None:
        return timeout
    return max(min(timeout, deadline - time.monotonic()), 0.001)


def past(deadline: float | None) -> bool:
    """Whether `deadline` (a time.monotonic() value, None: none) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def _read(resp: Any, deadline: float | None) -> bytes:
    # read1 returns after one receive, so a server that dribbles its answer is stopped at the deadline
    chunks = []
    while chunk := resp.read1(65536):
        chunks.append(chunk)
        if past(deadline):
            raise TimeoutError("the answer was still arriving at the time limit")
    return b"".join(chunks)


def chat_request(base_url: str, model: str | None, timeout: float,
                 deadline: float | None = None) -> tuple[bool, float, str]:
    """One small completion: (ok, latency in ms, detail on failure). Its timeout is cut to what is left
    before `deadline`, and reading the answer stops there."""
    body = json.dumps({"model": model or "default", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=time_left(deadline, timeout)) as resp:
            _read(resp, deadline)
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
    timed_out: bool = False  # stopped at its deadline: `requests` counts those measured before it

    @property
    def error_rate(self) -> float:
        """Failed requests as a fraction of those sent."""
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict:
        """The figures (rounded) as journal and report data."""
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p50_ms": round(self.p50_ms, 1), "p99_ms": round(self.p99_ms, 1)}


def slo_probe(base_url: str, model: str | None, warmup: int, requests: int, timeout: float,
              deadline: float | None = None) -> ProbeFigures:
    """Warm-up requests (not measured), then `requests` sequential ones, measured.

    `deadline` (a time.monotonic() value) bounds the whole probe: no request starts after it, each
    request's timeout is cut to what is left, and a probe stopped by it says `timed_out`. A request
    that failed because the deadline cut it short is not counted: it measured the limit, not the host.
    """
    for _ in range(warmup):
        if past(deadline):
            return ProbeFigures(0, 0, 0.0, 0.0, timed_out=True)
        chat_request(base_url, model, timeout, deadline)
    latencies, errors, first_error, timed_out = [], 0, "", False
    for _ in range(requests):
        if past(deadline):
            timed_out = True
            break
        ok, ms, detail = chat_request(base_url, model, timeout, deadline)
        if not ok and past(deadline):
            timed_out = True
            break
        latencies.append(ms)
        if not ok:
            errors += 1
            first_error = first_error or detail
    return ProbeFigures(len(latencies), errors, percentile(latencies, 50), percentile(latencies, 99), first_error,
                        timed_out)


def gpu_memory_by_gpu(base_url: str, timeout: float = 10, deadline: float | None = None) -> dict[str, float]:
    """MiB used on each GPU of the host, from the serving endpoint's /metrics (DCGM's metric).

    Keyed by the exporter's `gpu` label (the index), else its `UUID`, else the sample's position;
    samples with the same key (the MIG instances of one GPU) are added up. Raises ValueError when the
    scrape has no GPU memory at all.
    """
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=time_left(deadline, timeout)) as resp:
        metrics = parse_prometheus(_read(resp, deadline).decode(errors="replace"))
    samples = metrics.find(GPU_MEMORY_METRIC)
    if not samples:
        raise ValueError(f"{base_url}/metrics has no {GPU_MEMORY_METRIC}")
    used: dict[str, float] = {}
    for i, s in enumerate(samples):
        gpu = s.labels.get("gpu") or s.labels.get("UUID") or f"#{i}"
        used[gpu] = used.get(gpu, 0.0) + s.value
    return used


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


def _gpu_order(gpu: str) -> tuple[bool, int, str]:
    return (not gpu.isdigit(), int(gpu) if gpu.isdigit() else 0, gpu)


@dataclass
class SoakFigures:
    """What a soak measured: probes, worst P99 and error rate, each GPU's memory readings and their growth.

    Every GPU gets its own least-squares slope, and the soak is judged on the worst: a leak on a small
    GPU must not hide behind a larger, flat one. A GPU missing from some scrapes is fitted over the
    scrapes it appears in (least squares needs no regular spacing); one seen in fewer than two has no
    slope and is `unmeasured`: its growth is unknown, and a GPU that dropped out of the exporter may
    be the one that leaked, so the soak could not measure it (patching/rollout/gates.py).
    """

    samples: int
    p99_ms: float
    error_rate: float
    memory_mib: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # GPU -> (monotonic s, MiB)
    timed_out: bool = False  # stopped at its limit: the figures are those measured before it

    @property
    def gpu_memory_slopes(self) -> dict[str, float]:
        """GPU -> slope of its used memory in MiB/h, for every GPU seen in two scrapes or more."""
        return {gpu: slope_per_hour(self.memory_mib[gpu]) for gpu in sorted(self.memory_mib, key=_gpu_order)
                if len(self.memory_mib[gpu]) >= 2}

    @property
    def unmeasured(self) -> list[str]:
        """The GPUs seen in fewer than two scrapes: no slope."""
        return sorted((gpu for gpu, points in self.memory_mib.items() if len(points) < 2), key=_gpu_order)

    @property
    def gpu_memory_slope_mib_per_hour(self) -> float | None:
        """The worst GPU's slope, the one judged; None when no GPU has one."""
        return max(self.gpu_memory_slopes.values(), default=None)

    def as_dict(self) -> dict:
        """The figures (rounded) as journal and report data."""
        worst = self.gpu_memory_slope_mib_per_hour
        return {"samples": self.samples, "p99_ms": round(self.p99_ms, 1), "error_rate": round(self.error_rate, 4),
                "gpu_memory_slope_mib_per_hour": None if worst is None else round(worst, 1),
                "gpu_memory_slopes": {gpu: round(slope, 1) for gpu, slope in self.gpu_memory_slopes.items()},
                "gpu_memory_unmeasured": self.unmeasured,
                "gpu_memory_mib": {gpu: [m for _, m in self.memory_mib[gpu]]
                                   for gpu in sorted(self.memory_mib, key=_gpu_order)}}


def soak(base_url: str, model: str | None, duration_s: float, interval_s: float, requests_per_probe: int,
         timeout: float, stop: Callable[[], bool] = lambda: False, limit_s: float | None = None) -> SoakFigures:
    """Probe every `interval_s` for `duration_s` and read each GPU's memory each time (at least twice).

    `limit_s` bounds the whole soak: past it no request starts, each one's timeout is cut to what is
    left, and the figures measured so far come back `timed_out`.
    """
    started = time.monotonic()
    deadline = None if limit_s is None else started + limit_s
    readings: dict[str, list[tuple[float, float]]] = {}
    samples, worst_p99, worst_rate, timed_out = 0, 0.0, 0.0, False
    while True:
        figures = slo_probe(base_url, model, 0, requests_per_probe, timeout, deadline)
        if figures.requests:
            worst_p99, worst_rate = max(worst_p99, figures.p99_ms), max(worst_rate, figures.error_rate)
        if figures.timed_out:
            timed_out = True
            break
        try:
            memory = gpu_memory_by_gpu(base_url, timeout, deadline)
        except OSError:
            if not past(deadline):
                raise
            timed_out = True  # the read was cut short by the limit
            break
        now = time.monotonic()
        samples += 1
        for gpu, mib in memory.items():
            readings.setdefault(gpu, []).append((now, mib))
        elapsed = now - started
        if stop() or (elapsed >= duration_s and samples >= 2):
            break
        if elapsed < duration_s:
            time.sleep(min(interval_s, duration_s - elapsed, time_left(deadline, interval_s)))
    return SoakFigures(samples, worst_p99, worst_rate, readings, timed_out)


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
