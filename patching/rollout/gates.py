"""Every gate verdict is made here, from what an action measured and what the policy allows.

Actions only measure (patching/rollout/actions.py): an `Outcome` with `measured=False` (or a probe's
`ok=False`) says the figures are missing (host gone, probe refused, no check ran); the verdict is then
`could_not_measure`, kept apart from `failed` in the journal, the reports and JUnit. Either one
stops the host: a gate that could not see is not a pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from patching.rollout.actions import Outcome
from patching.rollout.policy import Policy
from patching.states import Gate, Verdict


@dataclass(frozen=True)
class Decision:
    """One gate's verdict on one host, with the figures and thresholds behind it."""

    gate: Gate
    verdict: Verdict
    detail: str
    measurements: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, Any] = field(default_factory=dict)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Whether the host may go on."""
        return self.verdict == Verdict.PASSED

    def outcome(self) -> Outcome:
        """The decision as the step's result for the host."""
        measured = self.verdict != Verdict.COULD_NOT_MEASURE
        return Outcome(self.ok, self.detail, self.timed_out, self.measurements, measured)


def thresholds(gate: Gate, policy: Policy) -> dict[str, Any]:
    """The limits a gate judges against, as journaled beside each decision."""
    slo, soak = policy.gates.slo, policy.gates.soak
    if gate == Gate.SLO:
        return {"p99_ms": slo.p99_ms, "max_error_rate": slo.max_error_rate}
    if gate == Gate.SOAK:
        return {"p99_ms": slo.p99_ms, "max_error_rate": slo.max_error_rate,
                "max_gpu_memory_slope_mib_per_hour": soak.max_gpu_memory_slope_mib_per_hour}
    return {}


def judge(gate: Gate, outcome: Outcome | None, policy: Policy) -> Decision:
    """The verdict of `gate` on one host's measured outcome (None: the action gave no answer)."""
    limits = thresholds(gate, policy)
    if outcome is None:
        return Decision(gate, Verdict.COULD_NOT_MEASURE, "no result from the action", thresholds=limits)
    probe = gate in (Gate.SLO, Gate.SOAK)
    if not outcome.measured or (probe and not outcome.ok):  # a probe's ok=False means it got no figures
        prefix = "probe failed: " if probe else ""
        return Decision(gate, Verdict.COULD_NOT_MEASURE, prefix + why(outcome) if probe else outcome.detail,
                        outcome.measurements, limits, outcome.timed_out)
    return _JUDGES[gate](outcome, policy, limits)


def why(outcome: Outcome | None) -> str:
    """An outcome in words: its detail, marked when it timed out."""
    if outcome is None:
        return "no result from the action"
    return ("timed out: " if outcome.timed_out else "") + (outcome.detail or ("ok" if outcome.ok else "failed"))


def _by_the_action(gate: Gate) -> Callable[[Outcome, Policy, dict[str, Any]], Decision]:
    """Gates whose action reports pass or fail itself: the playbook's result, the host checks."""

    def judge_result(outcome: Outcome, policy: Policy, limits: dict[str, Any]) -> Decision:
        verdict = Verdict.PASSED if outcome.ok else Verdict.FAILED
        return Decision(gate, verdict, outcome.detail, outcome.measurements, limits, outcome.timed_out)

    return judge_result


def _latency_problems(m: Mapping[str, Any], p99_ms: float, max_error_rate: float) -> tuple[list[str], str]:
    p99, errors = m["p99_ms"], m["error_rate"]
    problems = []
    if p99 >= p99_ms:
        problems.append(f"p99 {p99:.1f} ms >= {p99_ms:g} ms")
    if errors > max_error_rate:
        problems.append(f"error rate {errors:.2%} > {max_error_rate:.2%}")
    return problems, f"p99 {p99:.1f} ms, error rate {errors:.2%}"


def _judge_slo(outcome: Outcome, policy: Policy, limits: dict[str, Any]) -> Decision:
    """P99 below the threshold, error rate at most the maximum."""
    m = outcome.measurements
    if m.get("p99_ms") is None or m.get("error_rate") is None:
        return Decision(Gate.SLO, Verdict.COULD_NOT_MEASURE, "probe returned no p99_ms/error_rate", m, limits)
    problems, figures = _latency_problems(m, policy.gates.slo.p99_ms, policy.gates.slo.max_error_rate)
    if problems:
        return Decision(Gate.SLO, Verdict.FAILED, "; ".join(problems), m, limits)
    return Decision(Gate.SLO, Verdict.PASSED, figures, m, limits)


def _judge_soak(outcome: Outcome, policy: Policy, limits: dict[str, Any]) -> Decision:
    """Latency and errors as for the SLO probe, and GPU memory growth under the slope limit."""
    m = outcome.measurements
    slope = m.get("gpu_memory_slope_mib_per_hour")
    if m.get("p99_ms") is None or m.get("error_rate") is None:
        return Decision(Gate.SOAK, Verdict.COULD_NOT_MEASURE, "probe returned no p99_ms/error_rate", m, limits)
    if slope is None:
        return Decision(Gate.SOAK, Verdict.COULD_NOT_MEASURE, "soak returned no gpu_memory_slope_mib_per_hour",
                        m, limits)
    problems, figures = _latency_problems(m, policy.gates.slo.p99_ms, policy.gates.slo.max_error_rate)
    max_slope = policy.gates.soak.max_gpu_memory_slope_mib_per_hour
    if slope > max_slope:
        problems.append(f"GPU memory grows {slope:.0f} MiB/h > {max_slope:g} MiB/h")
    if problems:
        return Decision(Gate.SOAK, Verdict.FAILED, "; ".join(problems), m, limits)
    return Decision(Gate.SOAK, Verdict.PASSED, f"{figures}, GPU memory {slope:+.0f} MiB/h", m, limits)


_JUDGES: dict[Gate, Callable[[Outcome, Policy, dict[str, Any]], Decision]] = {
    Gate.ANSIBLE: _by_the_action(Gate.ANSIBLE),
    Gate.TESTINFRA: _by_the_action(Gate.TESTINFRA),
    Gate.SLO: _judge_slo,
    Gate.SOAK: _judge_soak,
}
