"""SLO probe, soak and traffic generator against the simulated serving releases (good, slow, leaking, erroring),
and against a fake endpoint on 127.0.0.1 that is as slow or as leaky as a test needs, and streams as a test needs."""

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from patching.hosts import probe
from patching.rollout import gates
from patching.rollout.actions import Outcome
from patching.rollout.policy import Policy
from patching.states import Gate, Verdict
from tests.unit.test_vendor_sim import dgx, exporter, serving, sim  # noqa: F401 - fixtures

MODEL = "deepseek-ai/DeepSeek-V3"
SLOW_S = 30.0  # how long the fake's slow answers take: every call under test must return long before


class FakeServing(ThreadingHTTPServer):
    """An OpenAI-style endpoint: completions answered after `delay` s (or `dribble`d byte by byte, one per
    `delay`), /metrics giving `gpus(scrape number)` -> {gpu index: MiB used} as DCGM_FI_DEV_FB_USED
    (or `metrics`, verbatim).

    A streaming request (`"stream": true`) is answered with Server-Sent Events as vLLM sends them: the role
    chunk at once, `tokens` content chunks, the first `ttft` s later and the others `itl` s apart, the last
    with its finish_reason, the usage chunk when asked, `data: [DONE]`. `sse=False` answers it with JSON
    instead; `cut_after` closes the connection after that many content chunks, without [DONE]."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0, dribble: bool = False,
                 gpus: Callable[[int], dict[str, float]] = lambda n: {"0": 1000.0}, metrics: str | None = None,
                 ttft: float = 0.0, itl: float = 0.0, tokens: int = 4, sse: bool = True, cut_after: int | None = None):
        super().__init__(("127.0.0.1", 0), FakeServing.Handler)
        self.delay, self.dribble, self.gpus, self.metrics = delay, dribble, gpus, metrics
        self.ttft, self.itl, self.tokens, self.sse, self.cut_after = ttft, itl, tokens, sse, cut_after
        self.released = threading.Event()  # set at teardown: sleeping answers give up at once
        self.completions = self.scrapes = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            srv = self.server
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with srv.lock:
                srv.completions += 1
            if request.get("stream") and srv.sse:
                self.stream(bool((request.get("stream_options") or {}).get("include_usage")))
                return
            body = b'{"object": "chat.completion", "choices": []}'
            if not srv.dribble and srv.released.wait(srv.delay):
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)) if srv.dribble else []:
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                if srv.released.wait(srv.delay):
                    return
            if not srv.dribble:
                self.wfile.write(body)

        def send(self, data: bytes) -> bool:
            """Write `data` at once, or byte by byte `delay` apart when dribbling; False once released."""
            srv = self.server
            for part in [data[i:i + 1] for i in range(len(data))] if srv.dribble else [data]:
                self.wfile.write(part)
                self.wfile.flush()
                if srv.dribble and srv.released.wait(srv.delay):
                    return False
            return True

        def stream(self, include_usage: bool) -> None:
            srv = self.server
            if not srv.dribble and srv.released.wait(srv.delay):
                return
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.end_headers()

            def event(choices: list, **extra) -> bytes:
                chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                         "choices": choices, **extra}
                return f"data: {json.dumps(chunk)}\n\n".encode()

            if not self.send(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}])):
                return
            for i in range(srv.tokens):
                if srv.released.wait(srv.ttft if i == 0 else srv.itl) or i == srv.cut_after:
                    return
                last = i == srv.tokens - 1
                if not self.send(event([{"index": 0, "delta": {"content": f" t{i}"},
                                         "finish_reason": "stop" if last else None}])):
                    return
            if include_usage and not self.send(event([], usage={"prompt_tokens": 1, "completion_tokens": srv.tokens,
                                                               "total_tokens": 1 + srv.tokens})):
                return
            self.send(b"data: [DONE]\n\n")

        def do_GET(self):
            srv = self.server
            with srv.lock:
                n, srv.scrapes = srv.scrapes, srv.scrapes + 1
            text = (srv.metrics or "".join(f'DCGM_FI_DEV_FB_USED{{gpu="{g}",UUID="GPU-{g}",device="nvidia{g}"}} {mib}\n'
                                           for g, mib in srv.gpus(n).items())).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)


@pytest.fixture
def fake_serving():
    """start(**FakeServing kwargs) -> a running FakeServing; all are stopped at teardown."""
    servers: list[FakeServing] = []

    def start(**kw) -> FakeServing:
        server = FakeServing(**kw)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.released.set()
        server.shutdown()
        server.server_close()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def test_percentile_nearest_rank():
    assert probe.percentile([], 99) == 0.0
    assert probe.percentile([5.0], 99) == 5.0
    assert probe.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert probe.percentile([float(i) for i in range(1, 101)], 50) == 50.0


def test_slope_per_hour():
    assert probe.slope_per_hour([(0, 100), (1, 100)]) == 0.0
    assert round(probe.slope_per_hour([(0, 0), (10, 1), (20, 2)])) == 360
    assert probe.slope_per_hour([(0, 1)]) == 0.0


def test_good_release_passes_the_default_slo(serving):  # noqa: F811
    server = serving()
    assert server.health_codes()[-1] == 200
    figures = probe.slo_probe(url(server), MODEL, warmup=2, requests=20, timeout=5)
    assert (figures.requests, figures.errors) == (20, 0) and figures.stream
    assert 0 < figures.p50_ms <= figures.p99_ms < 200
    # streamed: one TTFT and one mean gap per request, 8 tokens each, the first token before the end
    assert len(figures.ttft_ms) == len(figures.itl_ms) == 20 and figures.output_tokens == [8] * 20
    assert all(0 < t < lat for t, lat in zip(figures.ttft_ms, figures.latencies_ms, strict=True))
    assert 0 < figures.ttft_p99_ms < 200 and 0 < figures.itl_p99_ms < 50


def test_slow_release_p99_is_over_200ms(serving):  # noqa: F811
    server = serving("0.11.2")
    assert server.health_codes()[-1] == 200
    figures = probe.slo_probe(url(server), MODEL, warmup=0, requests=8, timeout=5)
    assert figures.errors == 0 and figures.p99_ms > 500
    assert figures.ttft_p99_ms > 500 and figures.ttft_p50_ms < 200  # the stall is before the first token
    assert figures.itl_p99_ms < 50  # the tokens after it come as fast as on a good release
    plain = probe.slo_probe(url(server), MODEL, warmup=0, requests=8, timeout=5, stream=False)
    assert plain.p99_ms > 500 and plain.ttft_p99_ms is None and plain.ttft_ms == plain.itl_ms == []


def test_erroring_release_has_an_error_rate(serving):  # noqa: F811
    server = serving("0.11.4", base_ms=1, jitter_ms=0)
    assert server.health_codes()[-1] == 200
    figures = probe.slo_probe(url(server), MODEL, warmup=0, requests=20, timeout=5)
    assert figures.errors == 2 and figures.error_rate == 0.1 and figures.first_error == "HTTP 500"


def test_soak_measures_the_leak(serving, exporter):  # noqa: F811
    leaking = serving("0.11.3")
    assert leaking.health_codes()[-1] == 200
    leak = probe.soak(url(leaking), MODEL, duration_s=0.6, interval_s=0.2, requests_per_probe=3, timeout=5,
                      metrics_url=exporter.url)
    used = [mib for _, mib in leak.memory_mib["0"]]
    assert leak.samples >= 3 and len(used) == leak.samples and used[-1] > used[0]
    assert leak.gpu_memory_slope_mib_per_hour > 10_000


def test_soak_of_a_good_release_is_flat(serving, exporter):  # noqa: F811
    good = serving()
    assert good.health_codes()[-1] == 200
    flat = probe.soak(url(good), MODEL, duration_s=0.6, interval_s=0.2, requests_per_probe=3, timeout=5,
                      metrics_url=exporter.url)
    assert flat.samples >= 3 and flat.gpu_memory_slope_mib_per_hour == 0.0


def test_soak_with_zero_duration_still_samples_twice(serving, exporter):  # noqa: F811
    server = serving()
    assert server.health_codes()[-1] == 200
    assert probe.soak(url(server), MODEL, 0, 1, 1, 5, metrics_url=exporter.url).samples == 2


def test_traffic_generator_is_bounded_and_counts_failures(serving):  # noqa: F811
    server = serving("0.11.4", base_ms=1, jitter_ms=0)
    assert server.health_codes()[-1] == 200
    gen = probe.TrafficGenerator([url(server)], lambda _: MODEL, concurrency=2, max_requests=30, max_seconds=20)
    started = time.monotonic()
    gen.start()
    while gen.figures.sent < 30 and time.monotonic() - started < 20:
        time.sleep(0.05)
    figures = gen.stop()
    assert figures.sent == 30 and len(figures.latencies_ms) == 30
    assert figures.failed == 3 and figures.failures == {"HTTP 500": 3}


def test_traffic_generator_counts_refused_connections():
    gen = probe.TrafficGenerator(["http://127.0.0.1:9"], lambda _: None, concurrency=1, max_requests=3,
                                 max_seconds=10, timeout=2).start()
    time.sleep(0.5)
    figures = gen.stop()
    assert figures.sent == 3 and figures.failed == 3


# ---- streaming: time to first token and inter-token latency -------------------------------------------

def test_a_stream_is_timed_from_its_content_chunks(fake_serving):
    ttft, itl = 0.3, 0.15  # the role chunk comes at once: it is not the first token
    server = fake_serving(ttft=ttft, itl=itl, tokens=4)
    sample = probe.chat_stream(server.url, MODEL, timeout=10)
    assert sample.ok and sample.detail == "" and sample.output_tokens == 4
    assert ttft * 1000 * 0.9 <= sample.ttft_ms < ttft * 1000 * 4
    assert len(sample.gaps_ms) == 3 and all(itl * 1000 * 0.9 <= g < itl * 1000 * 4 for g in sample.gaps_ms)
    assert sample.latency_ms >= sample.ttft_ms + sum(sample.gaps_ms)


def test_the_slo_probe_reports_ttft_itl_and_the_samples(fake_serving):
    ttft, itl = 0.2, 0.1
    server = fake_serving(ttft=ttft, itl=itl, tokens=3)
    figures = probe.slo_probe(server.url, MODEL, warmup=1, requests=3, timeout=10)
    assert (figures.requests, figures.errors) == (3, 0) and server.completions == 4
    assert len(figures.latencies_ms) == len(figures.ttft_ms) == len(figures.itl_ms) == 3
    assert len(figures.gaps_ms) == 6 and figures.output_tokens == [3, 3, 3]
    assert all(ttft * 1000 * 0.9 <= t < ttft * 1000 * 4 for t in figures.ttft_ms)
    assert all(itl * 1000 * 0.9 <= g < itl * 1000 * 4 for g in figures.itl_ms)  # each request's mean gap
    measured = figures.as_dict()
    assert measured["ttft_p99_ms"] == round(max(figures.ttft_ms), 1)  # nearest rank of 3: the largest
    assert measured["itl_p99_ms"] == round(max(figures.gaps_ms), 1)  # over every gap of every request
    assert measured["latencies_ms"] == [round(v, 3) for v in figures.latencies_ms]
    assert measured["ttft_ms"] == [round(v, 3) for v in figures.ttft_ms]
    assert measured["itl_ms"] == [round(v, 3) for v in figures.itl_ms]
    assert measured["stream"] is True and measured["output_tokens"] == [3, 3, 3]


def test_an_answer_that_is_not_an_event_stream_is_an_error(fake_serving):
    server = fake_serving(sse=False)  # JSON to a streaming request
    sample = probe.chat_stream(server.url, MODEL, timeout=5)
    assert not sample.ok and sample.detail == "not an event stream (Content-Type: application/json)"
    figures = probe.slo_probe(server.url, MODEL, warmup=0, requests=2, timeout=5)
    assert (figures.requests, figures.errors) == (2, 2) and figures.first_error.startswith("not an event stream")
    assert figures.ttft_ms == [] and figures.ttft_p99_ms is None and figures.as_dict()["itl_p99_ms"] is None


def test_a_stream_cut_before_done_is_an_error(fake_serving):
    server = fake_serving(tokens=4, cut_after=2)  # two content chunks, then the connection closes
    sample = probe.chat_stream(server.url, MODEL, timeout=5)
    assert not sample.ok and sample.detail == "the stream ended before data: [DONE] (after 3 chunk(s))"
    figures = probe.slo_probe(server.url, MODEL, warmup=0, requests=2, timeout=5)
    assert figures.errors == 2 and figures.ttft_ms == [] and not figures.timed_out


def test_a_dribbled_stream_is_cut_at_the_deadline(fake_serving):
    server = fake_serving(delay=0.3, dribble=True)  # every event byte by byte: minutes for the whole stream
    started = time.monotonic()
    sample = probe.chat_stream(server.url, MODEL, timeout=SLOW_S, deadline=time.monotonic() + 1)
    assert not sample.ok and sample.detail.startswith("TimeoutError") and time.monotonic() - started < SLOW_S / 2
    started = time.monotonic()  # without a deadline, the request's timeout bounds the whole stream
    sample = probe.chat_stream(server.url, MODEL, timeout=1)
    assert not sample.ok and sample.detail.startswith("TimeoutError") and time.monotonic() - started < SLOW_S / 2
    started = time.monotonic()
    figures = probe.slo_probe(server.url, MODEL, warmup=0, requests=3, timeout=SLOW_S, deadline=time.monotonic() + 1)
    assert time.monotonic() - started < SLOW_S / 2
    assert figures.timed_out and figures.requests == 0 and figures.errors == 0  # cut short: not an error


# ---- time limits -------------------------------------------------------------------------------------

def test_slo_probe_stops_at_its_deadline_when_the_host_is_slow(fake_serving):
    server = fake_serving(delay=SLOW_S)
    started = time.monotonic()
    figures = probe.slo_probe(server.url, MODEL, warmup=0, requests=5, timeout=SLOW_S * 2,
                              deadline=time.monotonic() + 1)
    assert time.monotonic() - started < SLOW_S / 2  # the request's own 60 s timeout was cut to the limit
    assert figures.timed_out and figures.requests == 0 and figures.errors == 0  # cut short: not an error
    assert server.completions == 1  # nothing was sent after the deadline


def test_slo_probe_issues_no_request_after_its_deadline(fake_serving):
    server = fake_serving(delay=0.2)  # 50 requests would take 10 s
    figures = probe.slo_probe(server.url, MODEL, warmup=2, requests=50, timeout=5, deadline=time.monotonic() + 1)
    assert figures.timed_out and 0 <= figures.requests < 50
    time.sleep(0.5)
    assert server.completions <= 2 + figures.requests + 1  # warm-up, the measured ones, the one cut short


def test_a_dribbled_answer_is_cut_at_the_deadline(fake_serving):
    server = fake_serving(delay=0.3, dribble=True)  # ~13 s for the whole body, each byte well within a timeout
    started = time.monotonic()
    ok, _, detail = probe.chat_request(server.url, MODEL, timeout=SLOW_S, deadline=time.monotonic() + 1)
    assert not ok and detail.startswith("TimeoutError") and time.monotonic() - started < SLOW_S / 2


def test_slo_probe_within_its_deadline_is_not_timed_out(fake_serving):
    server = fake_serving()
    figures = probe.slo_probe(server.url, MODEL, warmup=1, requests=5, timeout=5, deadline=time.monotonic() + 60)
    assert not figures.timed_out and (figures.requests, figures.errors) == (5, 0)


def test_soak_stops_at_its_limit(fake_serving):
    server = fake_serving(delay=SLOW_S)
    started = time.monotonic()
    figures = probe.soak(server.url, MODEL, duration_s=0.2, interval_s=0.1, requests_per_probe=2, timeout=SLOW_S,
                         metrics_url=server.url, limit_s=1)
    assert time.monotonic() - started < SLOW_S / 2
    assert figures.timed_out and figures.samples == 0 and figures.gpu_memory_slope_mib_per_hour is None


# ---- GPU memory, GPU by GPU ------------------------------------------------------------------------

def test_the_soak_takes_each_gpus_slope_and_a_leak_on_the_smaller_gpu_fails(fake_serving):
    # GPU0 large and flat, GPU1 smaller and growing 500 MiB per scrape: the old "largest GPU" series is flat
    server = fake_serving(gpus=lambda n: {"0": 70_000.0, "1": 2_000.0 + 500 * n})
    figures = probe.soak(server.url, MODEL, duration_s=0.6, interval_s=0.2, requests_per_probe=1, timeout=5,
                         metrics_url=server.url)  # the fake plays the DCGM exporter too
    assert figures.samples >= 3 and not figures.timed_out
    slopes = figures.gpu_memory_slopes
    assert set(slopes) == {"0", "1"} and slopes["0"] == 0.0 and slopes["1"] > 10_000
    measured = figures.as_dict()
    assert measured["gpu_memory_slope_mib_per_hour"] == round(slopes["1"], 1)  # the worst GPU is the figure
    assert measured["gpu_memory_slopes"] == {"0": 0.0, "1": round(slopes["1"], 1)}
    assert measured["gpu_memory_unmeasured"] == [] and measured["gpu_memory_mib"]["0"][0] == 70_000.0
    decision = gates.judge(Gate.SOAK, Outcome(True, measurements=measured), Policy())
    assert decision.verdict == Verdict.FAILED and "MiB/h > 512 MiB/h on GPU 1" in decision.detail


def test_a_gpu_missing_from_some_scrapes_is_fitted_on_the_others_and_one_seen_once_is_unmeasured():
    figures = probe.SoakFigures(4, 50.0, 0.0, {
        "0": [(0.0, 100.0), (60.0, 100.0), (120.0, 100.0), (180.0, 100.0)],
        "1": [(0.0, 100.0), (120.0, 140.0)],  # missing from two scrapes: fitted on the two it is in
        "2": [(60.0, 100.0)],  # one scrape: no slope
    })
    assert figures.gpu_memory_slopes == {"0": 0.0, "1": 1200.0}
    assert figures.unmeasured == ["2"] and figures.gpu_memory_slope_mib_per_hour == 1200.0
    assert figures.as_dict()["gpu_memory_unmeasured"] == ["2"]


def test_gpu_memory_is_read_per_gpu_and_mig_instances_are_added_up(fake_serving):
    server = fake_serving(metrics=(
        "# TYPE DCGM_FI_DEV_FB_USED gauge\n"
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",GPU_I_ID="1"} 10\n'
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",GPU_I_ID="2"} 5\n'
        'DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-b"} 20\n'
        'DCGM_FI_DEV_FB_USED{UUID="GPU-c"} 30\n'
        "vllm:num_requests_running 0\n"))
    assert probe.gpu_memory_by_gpu(server.url) == {"0": 15.0, "1": 20.0, "GPU-c": 30.0}
    with pytest.raises(ValueError, match="has no DCGM_FI_DEV_FB_USED"):
        probe.gpu_memory_by_gpu(fake_serving(metrics="vllm:num_requests_running 0\n").url)


class BootingServer(ThreadingHTTPServer):
    """/health as vLLM answers it while a container starts: 503 for the first `loading` asks, then 200."""

    def __init__(self, loading: int):
        self.asked = 0
        self.loading = loading
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.asked += 1
                self.send_response(503 if server.asked <= server.loading else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_wait_healthy_polls_through_loading_until_200():
    server = BootingServer(loading=3)
    try:
        assert probe.wait_healthy(server.url, timeout_s=30, interval_s=0.01) is None
        assert server.asked == 4  # three 503s, then the 200 it waited for
    finally:
        server.shutdown()


def test_wait_healthy_says_what_it_saw_last_when_time_runs_out():
    server = BootingServer(loading=10**6)
    try:
        assert probe.wait_healthy(server.url, timeout_s=0.3, interval_s=0.05) == "/health answered 503"
    finally:
        server.shutdown()
    with socket.socket() as s:  # a port nobody listens on: the server's container has not started yet
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "Connection refused" in probe.wait_healthy(f"http://127.0.0.1:{closed}", timeout_s=0.2, interval_s=0.05)
