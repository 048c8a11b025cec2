"""gates.judge keeps the three verdicts apart: a timed-out gate is a failure (marked timed out), missing
figures are could_not_measure, figures over the policy's limits are a failure; the soak is judged GPU by
GPU; and the runner gives the soak its time limit."""

from __future__ import annotations

import pytest

from patching.rollout import gates
from patching.rollout.actions import Outcome
from patching.rollout.policy import Policy
from patching.states import Gate, Verdict
from tests.unit.fakefleet import NEW
from tests.unit.test_runner import Harness

POLICY = Policy()
SLO_OK = {"requests": 50, "errors": 0, "error_rate": 0.0, "p50_ms": 20.0, "p99_ms": 48.0}


def soak_figures(slopes: dict[str, float], unmeasured: tuple[str, ...] = ()) -> dict:
    return {"samples": 10, "p99_ms": 51.0, "error_rate": 0.0, "gpu_memory_slopes": slopes,
            "gpu_memory_slope_mib_per_hour": max(slopes.values(), default=None),
            "gpu_memory_unmeasured": list(unmeasured)}


# ---- timed out: a failure, whatever the gate and whatever was measured ----------------------------

@pytest.mark.parametrize("gate, outcome", [
    (Gate.ANSIBLE, Outcome(False, "patch.yml ran past 2700s", timed_out=True)),
    (Gate.TESTINFRA, Outcome(False, "host checks ran past 900s and were stopped", timed_out=True,
                             measured=False)),
    (Gate.SLO, Outcome(False, "SLO probe ran past 1s (3 of 50 requests measured)", timed_out=True,
                       measurements={**SLO_OK, "requests": 3})),
    (Gate.SOAK, Outcome(False, "soak ran past 1500s (4 sample(s) taken)", timed_out=True,
                        measurements=soak_figures({"0": 0.0}))),
])
def test_a_timed_out_gate_is_a_timed_out_failure(gate, outcome):
    decision = gates.judge(gate, outcome, POLICY)
    assert decision.verdict == Verdict.FAILED and decision.timed_out and not decision.ok
    assert decision.detail == "timed out: " + outcome.detail
    assert decision.measurements == outcome.measurements  # what it had measured by then is kept
    back = decision.outcome()
    assert (back.ok, back.timed_out, back.measured) == (False, True, True)


def test_missing_figures_are_could_not_measure_not_failed_and_not_timed_out():
    for gate in Gate:
        decision = gates.judge(gate, Outcome(False, "no host check ran", measured=False), POLICY)
        assert decision.verdict == Verdict.COULD_NOT_MEASURE and not decision.timed_out, gate
    assert gates.judge(Gate.SLO, None, POLICY).verdict == Verdict.COULD_NOT_MEASURE
    probe_refused = gates.judge(Gate.SLO, Outcome(False, "connection refused"), POLICY)
    assert probe_refused.verdict == Verdict.COULD_NOT_MEASURE and probe_refused.detail.startswith("probe failed")


def test_figures_over_the_limits_fail_without_being_timed_out():
    slow = gates.judge(Gate.SLO, Outcome(True, measurements={**SLO_OK, "p99_ms": 480.0}), POLICY)
    assert slow.verdict == Verdict.FAILED and not slow.timed_out and "p99 480.0 ms >= 200 ms" in slow.detail
    assert gates.judge(Gate.SLO, Outcome(True, measurements=SLO_OK), POLICY).verdict == Verdict.PASSED
    failed_checks = gates.judge(Gate.TESTINFRA, Outcome(False, "gpu_driver: expected 580.95.05"), POLICY)
    assert failed_checks.verdict == Verdict.FAILED and not failed_checks.timed_out


# ---- the soak, GPU by GPU --------------------------------------------------------------------------

def test_a_leak_on_any_gpu_fails_the_soak_and_names_it():
    decision = gates.judge(Gate.SOAK, Outcome(True, measurements=soak_figures(
        {"0": 0.0, "1": 18_000.0, "2": 3.0, "3": 900.0})), POLICY)
    assert decision.verdict == Verdict.FAILED
    assert decision.detail == "GPU memory grows 18000 MiB/h > 512 MiB/h on GPU 1 (and on GPU 3)"


def test_a_flat_soak_passes_naming_its_worst_gpu():
    decision = gates.judge(Gate.SOAK, Outcome(True, measurements=soak_figures({"0": 0.0, "1": 40.0})), POLICY)
    assert decision.verdict == Verdict.PASSED and decision.detail.endswith("GPU memory +40 MiB/h on GPU 1")


def test_a_gpu_the_soak_could_not_fit_is_could_not_measure_unless_another_fails():
    unseen = gates.judge(Gate.SOAK, Outcome(True, measurements=soak_figures({"0": 0.0}, ("1",))), POLICY)
    assert unseen.verdict == Verdict.COULD_NOT_MEASURE
    assert unseen.detail == "GPU memory not measured on GPU 1 (seen in fewer than 2 scrapes)"
    leak = gates.judge(Gate.SOAK, Outcome(True, measurements=soak_figures({"0": 9000.0}, ("1",))), POLICY)
    assert leak.verdict == Verdict.FAILED and leak.detail.endswith("; GPU memory not measured on GPU 1 "
                                                                   "(seen in fewer than 2 scrapes)")


def test_a_soak_reporting_only_the_single_slope_is_still_judged():
    m = {"samples": 10, "p99_ms": 51.0, "error_rate": 0.0, "gpu_memory_slope_mib_per_hour": 2048.0}
    decision = gates.judge(Gate.SOAK, Outcome(True, measurements=m), POLICY)
    assert decision.verdict == Verdict.FAILED and decision.detail == "GPU memory grows 2048 MiB/h > 512 MiB/h"
    m.pop("gpu_memory_slope_mib_per_hour")
    assert gates.judge(Gate.SOAK, Outcome(True, measurements=m), POLICY).verdict == Verdict.COULD_NOT_MEASURE


# ---- the runner gives the soak its limit, and journals a timed-out soak as failed -----------------

def test_the_soak_is_given_its_duration_plus_the_gate_timeout(tmp_path):
    h = Harness(tmp_path, {"gates": {"soak": {"duration": "2m"}}, "timeouts": {"gate": "30s"}})
    assert h.run().exit_code == 0
    assert h.fleet.limits["soak"] == 150.0


def test_a_timed_out_soak_is_journaled_as_a_timed_out_failure(tmp_path):
    h = Harness(tmp_path, {"budgets": {"canary": 1}})
    h.fleet.faults[("a1", "timeout:soak", NEW)] = "soak ran past 1500s (4 sample(s) taken)"
    h.run()
    (gate,) = [e.data for e in h.journal.of_run(1).events()
               if e.kind == "gate" and e.host == "a1" and e.data["gate"] == "soak" and e.data["phase"] == "rollout"]
    assert (gate["verdict"], gate["timed_out"], gate["ok"]) == ("failed", True, False)
    assert gate["detail"] == "timed out: soak ran past 1500s (4 sample(s) taken)"
