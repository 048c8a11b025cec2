"""Serving probes: the SLO probe straight at a host, the soak's GPU-memory sampling, and a bounded
traffic generator for live load through a load balancer.

Everything here speaks plain HTTP to an OpenAI-compatible endpoint (`/v1/chat/completions`,
`/metrics`); the figures are returned, and the runner judges them against the policy.

The SLO probe streams (`"stream": true`, as vLLM answers it: Server-Sent Events `data: {chat.completion.chunk}`,
ending `data: [DONE]`) and measures per request what a user feels (`chat_stream`):

- latency: from sending the request (connecting included) to receiving `data: [DONE]`;
- time to first token (TTFT): from sending the request to the first chunk whose `delta.content` is not empty
  (the role-only first chunk does not count);
- inter-token latency (ITL): the gaps between consecutive chunks carrying content, as they arrive;
- output tokens: the usage chunk's `completion_tokens` (`stream_options.include_usage` asks for it), else the
  number of content chunks.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
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
class Sample:
    """One measured request (module docstring: the definitions); TTFT, gaps and tokens only for a stream
    that got content."""

    ok: bool
    latency_ms: float
    detail: str = ""  # why it failed
    ttft_ms: float | None = None
    gaps_ms: list[float] = field(default_factory=list)  # between consecutive content chunks
    output_tokens: int = 0


class StreamError(Exception):
    """The answer is not a well-formed event stream to its end: the message says how."""


def _events(resp: Any, deadline: float | None) -> Iterator[tuple[float, str]]:
    """(arrival time, data) of each Server-Sent Event as it arrives: `data:` lines joined, comments and other
    fields skipped, an event dispatched at its blank line. Reading stops at `deadline` (TimeoutError)."""
    pending = b""  # the line still arriving
    data: list[str] = []  # the event's data lines so far
    while chunk := resp.read1(65536):  # one receive at a time: every event is timed as it arrives
        arrived = time.monotonic()
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if not line:
                if data:
                    yield arrived, "\n".join(data)
                data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if past(deadline):
            raise TimeoutError("the stream was still arriving at the time limit")


def _read_stream(resp: Any, deadline: float | None) -> tuple[list[float], int | None]:
    """The arrival times of the chunks carrying content and the usage chunk's completion_tokens (None: no
    usage chunk); StreamError when the stream reports an error, has a chunk that is not a completion chunk,
    or ends before `data: [DONE]`."""
    content_at: list[float] = []
    tokens, chunks = None, 0
    for arrived, data in _events(resp, deadline):
        if data == "[DONE]":
            return content_at, tokens
        chunks += 1
        try:
            chunk = json.loads(data)
        except ValueError:
            raise StreamError(f"chunk {chunks} is not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"chunk {chunks} is not a JSON object: {data[:80]!r}")
        if "error" in chunk or chunk.get("object") == "error":  # vLLM's streaming error response
            error = chunk.get("error")
            message = error.get("message") if isinstance(error, dict) else error or chunk.get("message")
            raise StreamError(f"the stream reported an error: {message}")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise StreamError(f"chunk {chunks} has no choices: {data[:80]!r}")
        if any(isinstance(c, dict) and isinstance(c.get("delta"), dict) and c["delta"].get("content")
               for c in choices):
            content_at.append(arrived)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            tokens = usage["completion_tokens"]
    raise StreamError(f"the stream ended before data: [DONE] (after {chunks} chunk(s))")


def chat_stream(base_url: str, model: str | None, timeout: float, deadline: float | None = None) -> Sample:
    """One small streamed completion, measured (module docstring). Not ok, saying why: an HTTP error, an
    answer that is not an event stream, a stream that breaks or ends before `data: [DONE]`, one without
    content, or time (`TimeoutError`): the timeout is cut to what is left before `deadline`, and reading
    stops there, or once the whole stream has taken `timeout` (a stream trickling forever ends too)."""
    body = json.dumps({"model": model or "default", "max_tokens": 8, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    started = time.monotonic()
    cut = started + timeout if deadline is None else min(deadline, started + timeout)
    sample = Sample(False, 0.0)
    try:
        with urllib.request.urlopen(req, timeout=time_left(deadline, timeout)) as resp:
            content_type = resp.headers.get("Content-Type") or ""
            if resp.status != 200:
                sample.detail = f"HTTP {resp.status}"
            elif content_type.split(";")[0].strip().lower() != "text/event-stream":
                sample.detail = f"not an event stream (Content-Type: {content_type or 'none'})"
            else:
                content_at, tokens = _read_stream(resp, cut)
                if not content_at:
                    sample.detail = "the stream ended without content"
                else:
                    sample.ok = True
                    sample.ttft_ms = (content_at[0] - started) * 1000
                    sample.gaps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(content_at)]
                    sample.output_tokens = tokens if tokens is not None else len(content_at)
    except urllib.error.HTTPError as exc:
        sample.detail = f"HTTP {exc.code}"
    except StreamError as exc:
        sample.detail = str(exc)
    except http.client.HTTPException as exc:  # IncompleteRead: a chunked stream cut short
        sample.detail = f"the stream broke: {type(exc).__name__}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        sample.detail = type(exc).__name__ + (f": {exc.reason}" if hasattr(exc, "reason") else "")
    sample.latency_ms = (time.monotonic() - started) * 1000
    return sample


def _measure(base_url: str, model: str | None, timeout: float, deadline: float | None, stream: bool) -> Sample:
    if stream:
        return chat_stream(base_url, model, timeout, deadline)
    ok, ms, detail = chat_request(base_url, model, timeout, deadline)
    return Sample(ok, ms, detail)


@dataclass
class ProbeFigures:
    """What one SLO probe measured: requests, errors, P50/P99 latency, the first error, and for a streaming
    probe time to first token and inter-token latency (module docstring: the definitions).

    The per-request samples are kept for a comparison with a baseline (one value per request, so that they
    are independent draws): `latencies_ms` every measured request, failed ones included (as P50/P99);
    `ttft_ms` each successful stream's; `itl_ms` each successful stream's *mean* gap between its content
    chunks (streams of one content chunk have none). `gaps_ms` pools every gap of every successful stream:
    ITL's P50/P99 are taken over it, as vLLM's benchmarks take them, so a single stall shows in the tail.
    """

    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    first_error: str = ""
    timed_out: bool = False  # stopped at its deadline: `requests` counts those measured before it
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)  # each successful stream's
    stream: bool = True

    @property
    def error_rate(self) -> float:
        """Failed requests as a fraction of those sent."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def ttft_p50_ms(self) -> float | None:
        """Median time to first token; None when no stream got content (or the probe did not stream)."""
        return percentile(self.ttft_ms, 50) if self.ttft_ms else None

    @property
    def ttft_p99_ms(self) -> float | None:
        """P99 time to first token; None when no stream got content (or the probe did not stream)."""
        return percentile(self.ttft_ms, 99) if self.ttft_ms else None

    @property
    def itl_p50_ms(self) -> float | None:
        """Median gap between tokens, over all gaps of all streams; None without any gap."""
        return percentile(self.gaps_ms, 50) if self.gaps_ms else None

    @property
    def itl_p99_ms(self) -> float | None:
        """P99 gap between tokens, over all gaps of all streams; None without any gap."""
        return percentile(self.gaps_ms, 99) if self.gaps_ms else None

    def as_dict(self) -> dict:
        """The figures (rounded) as journal and report data: the summaries, then the per-request samples."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p50_ms": round(self.p50_ms, 1), "p99_ms": round(self.p99_ms, 1), "stream": self.stream,
                "ttft_p50_ms": ms(self.ttft_p50_ms), "ttft_p99_ms": ms(self.ttft_p99_ms),
                "itl_p50_ms": ms(self.itl_p50_ms), "itl_p99_ms": ms(self.itl_p99_ms),
                "latencies_ms": [round(v, 3) for v in self.latencies_ms],
                "ttft_ms": [round(v, 3) for v in self.ttft_ms],
                "itl_ms": [round(v, 3) for v in self.itl_ms],
                "output_tokens": list(self.output_tokens)}


def wait_healthy(base_url: str, timeout_s: float, interval_s: float = 1.0) -> str | None:
    """Poll vLLM's GET /health until it answers 200 (the server has loaded its weights) or `timeout_s` passes;
    None when it did, else what it answered last (a status, or the connection's error). A server that starts
    at boot (a container after a reboot) answers nothing, then 503 while loading, then 200."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            wait = max(0.5, time_left(deadline, 5.0))
            with urllib.request.urlopen(f"{base_url}/health", timeout=wait) as resp:
                if resp.status == 200:
                    return None
                last = f"/health answered {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"/health answered {exc.code}"
        except (OSError, ValueError) as exc:
            last = f"/health: {getattr(exc, 'reason', None) or exc}"
        if time.monotonic() + interval_s > deadline:
            return last
        time.sleep(interval_s)


def slo_probe(base_url: str, model: str | None, warmup: int, requests: int, timeout: float,
              deadline: float | None = None, stream: bool = True) -> ProbeFigures:
    """Warm-up requests (not measured), then `requests` sequential ones, measured; streamed (`chat_stream`)
    unless `stream` is False (`chat_request`: latency only).

    `deadline` (a time.monotonic() value) bounds the whole probe: no request starts after it, each
    request's timeout is cut to what is left, a stream still arriving at it is cut there, and a probe
    stopped by it says `timed_out`. A request that failed because the deadline cut it short is not
    counted: it measured the limit, not the host.
    """
    for _ in range(warmup):
        if past(deadline):
            return ProbeFigures(0, 0, 0.0, 0.0, timed_out=True, stream=stream)
        _measure(base_url, model, timeout, deadline, stream)
    figures = ProbeFigures(0, 0, 0.0, 0.0, stream=stream)
    for _ in range(requests):
        if past(deadline):
            figures.timed_out = True
            break
        sample = _measure(base_url, model, timeout, deadline, stream)
        if not sample.ok and past(deadline):
            figures.timed_out = True
            break
        figures.latencies_ms.append(sample.latency_ms)
        if not sample.ok:
            figures.errors += 1
            figures.first_error = figures.first_error or sample.detail
        elif sample.ttft_ms is not None:
            figures.ttft_ms.append(sample.ttft_ms)
            figures.output_tokens.append(sample.output_tokens)
            figures.gaps_ms += sample.gaps_ms
            if sample.gaps_ms:
                figures.itl_ms.append(sum(sample.gaps_ms) / len(sample.gaps_ms))
    figures.requests = len(figures.latencies_ms)
    figures.p50_ms, figures.p99_ms = percentile(figures.latencies_ms, 50), percentile(figures.latencies_ms, 99)
    return figures


def gpu_memory_by_gpu(metrics_url: str, timeout: float = 10, deadline: float | None = None) -> dict[str, float]:
    """MiB used on each GPU of the host, from its DCGM exporter's /metrics (`metrics_url`, port 9400 by default).

    Keyed by the exporter's `gpu` label (the index), else its `UUID`, else the sample's position;
    samples with the same key (the MIG instances of one GPU) are added up. Raises ValueError when the
    scrape has no GPU memory at all.
    """
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=time_left(deadline, timeout)) as resp:
        metrics = parse_prometheus(_read(resp, deadline).decode(errors="replace"))
    samples = metrics.find(GPU_MEMORY_METRIC)
    if not samples:
        raise ValueError(f"{metrics_url}/metrics has no {GPU_MEMORY_METRIC}")
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
         timeout: float, *, metrics_url: str, stop: Callable[[], bool] = lambda: False,
         limit_s: float | None = None) -> SoakFigures:
    """Probe every `interval_s` for `duration_s` and read each GPU's memory each time (at least twice), from
    the host's DCGM exporter at `metrics_url` (the serving endpoint has no GPU memory: vLLM's /metrics is
    its own `vllm:` figures).

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
            memory = gpu_memory_by_gpu(metrics_url, timeout, deadline)
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
