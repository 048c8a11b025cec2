"""SLO probe, soak and traffic generator against the simulated serving releases (good, slow, leaking, erroring),
and against a fake endpoint on 127.0.0.1 that is as slow or as leaky as a test needs."""

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
from tests.unit.test_vendor_sim import dgx, serving, sim  # noqa: F401 - fixtures

MODEL = "deepseek-ai/DeepSeek-V3"
SLOW_S = 30.0  # how long the fake's slow answers take: every call under test must return long before


class FakeServing(ThreadingHTTPServer):
    """An OpenAI-style endpoint: completions answered after `delay` s (or `dribble`d byte by byte, one per
    `delay`), /metrics giving `gpus(scrape number)` -> {gpu index: MiB used} as DCGM_FI_DEV_FB_USED
    (or `metrics`, verbatim)."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0, dribble: bool = False,
                 gpus: Callable[[int], dict[str, float]] = lambda n: {"0": 1000.0}, metrics: str | None = None):
        super().__init__(("127.0.0.1", 0), FakeServing.Handler)
        self.delay, self.dribble, self.gpus, self.metrics = delay, dribble, gpus, metrics
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
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with srv.lock:
                srv.completions += 1
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
    assert (figures.requests, figures.errors) == (20, 0)
    assert 0 < figures.p50_ms <= figures.p99_ms < 200


def test_slow_release_p99_is_over_200ms(serving):  # noqa: F811
    server = serving("0.11.2")
    assert server.health_codes()[-1] == 200
    figures = probe.slo_probe(url(server), MODEL, warmup=0, requests=8, timeout=5)
    assert figures.errors == 0 and figures.p99_ms > 500


def test_erroring_release_has_an_error_rate(serving):  # noqa: F811
    server = serving("0.11.4", base_ms=1, jitter_ms=0)
    assert server.health_codes()[-1] == 200
    figures = probe.slo_probe(url(server), MODEL, warmup=0, requests=20, timeout=5)
    assert figures.errors == 2 and figures.error_rate == 0.1 and figures.first_error == "HTTP 500"


def test_soak_measures_the_leak(serving):  # noqa: F811
    leaking = serving("0.11.3")
    assert leaking.health_codes()[-1] == 200
    leak = probe.soak(url(leaking), MODEL, duration_s=0.6, interval_s=0.2, requests_per_probe=3, timeout=5)
    used = [mib for _, mib in leak.memory_mib["0"]]
    assert leak.samples >= 3 and len(used) == leak.samples and used[-1] > used[0]
    assert leak.gpu_memory_slope_mib_per_hour > 10_000


def test_soak_of_a_good_release_is_flat(serving):  # noqa: F811
    good = serving()
    assert good.health_codes()[-1] == 200
    flat = probe.soak(url(good), MODEL, duration_s=0.6, interval_s=0.2, requests_per_probe=3, timeout=5)
    assert flat.samples >= 3 and flat.gpu_memory_slope_mib_per_hour == 0.0


def test_soak_with_zero_duration_still_samples_twice(serving):  # noqa: F811
    server = serving()
    assert server.health_codes()[-1] == 200
    assert probe.soak(url(server), MODEL, 0, 1, 1, 5).samples == 2


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
                         limit_s=1)
    assert time.monotonic() - started < SLOW_S / 2
    assert figures.timed_out and figures.samples == 0 and figures.gpu_memory_slope_mib_per_hour is None


# ---- GPU memory, GPU by GPU ------------------------------------------------------------------------

def test_the_soak_takes_each_gpus_slope_and_a_leak_on_the_smaller_gpu_fails(fake_serving):
    # GPU0 large and flat, GPU1 smaller and growing 500 MiB per scrape: the old "largest GPU" series is flat
    server = fake_serving(gpus=lambda n: {"0": 70_000.0, "1": 2_000.0 + 500 * n})
    figures = probe.soak(server.url, MODEL, duration_s=0.6, interval_s=0.2, requests_per_probe=1, timeout=5)
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
