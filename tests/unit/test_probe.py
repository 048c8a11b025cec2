"""SLO probe, soak and traffic generator against the simulated serving releases (good, slow, leaking, erroring)."""

import time

from patching.hosts import probe
from tests.unit.test_vendor_sim import dgx, serving, sim  # noqa: F401 - fixtures

MODEL = "deepseek-ai/DeepSeek-V3"


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
    assert leak.samples >= 3 and leak.memory_mib[-1] > leak.memory_mib[0]
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
