"""Benchmark: the old absolute SLO gate (40 requests, P99 < 200 ms) against the new judge (a baseline of the
same interval, patching/rollout/stats.py), on the lab's simulated vLLM server while a CPU hog competes for
every core.

    .venv/bin/python bench/gates.py                     # 10 trials per release, a hog on each core
    .venv/bin/python bench/gates.py --policy docs/policy.example.yaml   # the production example (P99: 299 requests)
    .venv/bin/python bench/gates.py --trials 20 --no-hog

Three copies of the lab's server (lab/vendor/serving/vllm_serving.py, the program the lab hosts run,
here as plain processes on 127.0.0.1 with the simulated driver): a candidate on the good release
(0.11.1), a candidate on the known-bad slow release (0.11.2: a quarter of requests 600 ms slower), and
a peer on the good release, the baseline. Each trial probes a candidate and the peer at the same time
(streaming requests, as the gate does) and asks both gates:

- old: P99 of 40 requests below 200 ms (a P99 of 40 samples is their maximum);
- new: the absolute ceilings (P99 below 200 ms over the needed samples, no errors) and then each
  per-request figure (latency, TTFT, ITL) against the peer's: worse / same / inconclusive, sampling
  more (up to the policy's bound) while inconclusive.

It prints, per gate, the false-failure rate on the good release and the detection rate on the slow one.
The hog is a bounded busy loop per core (it stops after --hog-seconds at the latest, and is killed by its
PID when the bench ends).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patching.hosts import probe  # noqa: E402
from patching.rollout import gates  # noqa: E402
from patching.rollout.actions import Outcome  # noqa: E402
from patching.rollout.policy import Policy, load_policy  # noqa: E402
from patching.states import Gate, Verdict  # noqa: E402
from tests import cpuhog  # noqa: E402
from tests.unit.test_vendor_sim import DGX, NEW, Serving, Sim, package  # noqa: E402

MODEL = "deepseek-ai/DeepSeek-V3"


def start(base: Path, version: str) -> Serving:
    sim = Sim(base)
    sim.host(DGX).install(package(NEW, "cuda-drivers-")).install(package(NEW, "nvidia-fabricmanager"))
    sim.boot()
    server = Serving(sim, version, load_seconds=0.3, warmup_requests=0)
    # its access log goes to pipes: read them, or a full pipe blocks the server's threads mid-request
    for stream in (server.proc.stdout, server.proc.stderr):
        threading.Thread(target=stream.read, daemon=True).start()
    assert server.health_codes()[-1] == 200, f"{version} did not come up"
    return server


def measure(port: int, requests: int) -> Outcome:
    figures = probe.slo_probe(f"http://127.0.0.1:{port}", MODEL, 3, requests, 10.0)
    return Outcome(True, measurements=figures.as_dict())


def old_gate(port: int, policy: Policy) -> bool:
    """True when the old gate fails the host: P99 of 40 requests at or above the ceiling."""
    m = measure(port, 40).measurements
    return m["p99_ms"] >= policy.gates.slo.p99_ms or m["error_rate"] > policy.gates.slo.max_error_rate


def new_gate(candidate: int, peer: int, policy: Policy, pool: ThreadPoolExecutor, release: str) -> Verdict:
    """The runner's SLO gate, reduced to one candidate and one peer: same interval, sampling more while unsure."""
    slo = policy.gates.slo
    asked, bound, total = slo.needed_requests(), slo.request_bound(), 0
    cand = base = None
    while True:
        c, b = pool.submit(measure, candidate, asked), pool.submit(measure, peer, asked)
        cand, base = gates.merge_rounds(cand, c.result()), gates.merge_rounds(base, b.result())
        total += asked
        decision = gates.judge(Gate.SLO, cand, policy, gates.Baseline.of("peer", [base]))
        asked = min(max(asked, bound // 4), bound - total)
        if decision.verdict != Verdict.INCONCLUSIVE or asked <= 0:
            if release == "good" and decision.verdict != Verdict.PASSED:
                print(f"  good release {decision.verdict.value} after {total} requests: {decision.detail}", flush=True)
            return decision.verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--no-hog", action="store_true", help="no CPU hog (the quiet baseline)")
    parser.add_argument("--hog-seconds", type=float, default=1800)
    parser.add_argument("--hog-per-core", type=int, default=1, help="busy loops per core (default 1)")
    parser.add_argument("--policy", default=str(ROOT / "lab/policy.yaml"),
                        help="the policy whose SLO gate is judged (default: the lab's, as `make demo` runs it)")
    args = parser.parse_args()
    policy, _ = load_policy(args.policy)
    slo = policy.gates.slo
    print(f"policy {args.policy}: P{slo.quantile * 100:g} over {slo.needed_requests()} requests "
          f"(bound {slo.request_bound()}), ceiling P99 {slo.p99_ms} ms, tolerance {slo.tolerance}, "
          f"confidence {slo.confidence}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-gates-") as tmp:
        servers = {name: start(Path(tmp) / name, version)
                   for name, version in (("good", "0.11.1"), ("slow", "0.11.2"), ("peer", "0.11.1"))}
        hogs = [] if args.no_hog else cpuhog.start(args.hog_seconds, args.hog_per_core)
        results: dict[str, dict[str, list]] = {r: {"old": [], "new": []} for r in ("good", "slow")}
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(2) as pool:
                for trial in range(args.trials):
                    for release in ("good", "slow"):
                        port = servers[release].port
                        results[release]["old"].append(old_gate(port, policy))
                        results[release]["new"].append(new_gate(port, servers["peer"].port, policy, pool,
                                                                        release))
                    print(f"trial {trial + 1}/{args.trials}: old {[results[r]['old'][-1] for r in results]}, "
                          f"new {[results[r]['new'][-1].value for r in results]}", flush=True)
        finally:
            cpuhog.stop(hogs)
            for server in servers.values():
                server.stop()
    n = args.trials
    load = "no hog" if args.no_hog else f"{args.hog_per_core} busy loop(s) on each of {cpuhog.cores()} cores"
    print(f"\n{n} trials per release, {load}, {time.monotonic() - started:.0f} s")
    old_false = sum(results["good"]["old"])
    new_false = sum(v == Verdict.FAILED for v in results["good"]["new"])
    new_unsure = sum(v == Verdict.INCONCLUSIVE for v in results["good"]["new"])
    old_caught = sum(results["slow"]["old"])
    new_caught = sum(v == Verdict.FAILED for v in results["slow"]["new"])
    print(f"good release 0.11.1, false failures: old gate {old_false}/{n} ({old_false / n:.0%}), "
          f"new judge {new_false}/{n} ({new_false / n:.0%}; inconclusive {new_unsure}/{n})")
    print(f"slow release 0.11.2, caught:         old gate {old_caught}/{n} ({old_caught / n:.0%}), "
          f"new judge {new_caught}/{n} ({new_caught / n:.0%})")


if __name__ == "__main__":
    main()
