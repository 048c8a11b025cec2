"""Every gate verdict is made here, from what an action measured and what the policy allows.

Actions only measure (patching/rollout/actions.py): an `Outcome` with `measured=False` (or a probe's
`ok=False`) says the figures are missing (host gone, probe refused, no check ran); the verdict is then
`could_not_measure`, kept apart from `failed` in the journal, the reports and JUnit. Either one
stops the host: a gate that could not see is not a pass. An outcome that ran over its time limit
(`timed_out`) is `failed`, marked timed out, whatever it had measured by then: the host did not
answer within what the policy allows.
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
    if outcome.timed_out:  # over its time limit: the host failed the gate, whatever was measured by then
        return Decision(gate, Verdict.FAILED, why(outcome), outcome.measurements, limits, timed_out=True)
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
    """Latency and errors as for the SLO probe, and every GPU's memory growth under the slope limit.

    `gpu_memory_slopes` ({GPU: MiB/h}) is judged GPU by GPU; without it, the single
    `gpu_memory_slope_mib_per_hour`. A GPU the soak could not fit (`gpu_memory_unmeasured`) makes
    the verdict could_not_measure unless something measured already failed.
    """
    m = outcome.measurements
    if m.get("p99_ms") is None or m.get("error_rate") is None:
        return Decision(Gate.SOAK, Verdict.COULD_NOT_MEASURE, "probe returned no p99_ms/error_rate", m, limits)
    slopes: Mapping[str, float] = m.get("gpu_memory_slopes") or {}
    if not slopes and m.get("gpu_memory_slope_mib_per_hour") is not None:
        slopes = {"": m["gpu_memory_slope_mib_per_hour"]}
    unmeasured = [str(gpu) for gpu in m.get("gpu_memory_unmeasured") or []]
    if not slopes and not unmeasured:
        return Decision(Gate.SOAK, Verdict.COULD_NOT_MEASURE, "soak returned no gpu_memory_slope_mib_per_hour",
                        m, limits)
    problems, figures = _latency_problems(m, policy.gates.slo.p99_ms, policy.gates.slo.max_error_rate)
    max_slope = policy.gates.soak.max_gpu_memory_slope_mib_per_hour
    growing = sorted((gpu for gpu, slope in slopes.items() if slope > max_slope), key=lambda g: -slopes[g])
    if growing:
        worst = growing[0]
        problems.append(f"GPU memory grows {slopes[worst]:.0f} MiB/h > {max_slope:g} MiB/h{_on_gpu(worst)}"
                        + (f" (and on GPU {', '.join(growing[1:])})" if growing[1:] else ""))
    not_seen = f"GPU memory not measured on GPU {', '.join(unmeasured)} (seen in fewer than 2 scrapes)"
    if problems:
        return Decision(Gate.SOAK, Verdict.FAILED, "; ".join(problems + ([not_seen] if unmeasured else [])),
                        m, limits)
    if unmeasured:
        return Decision(Gate.SOAK, Verdict.COULD_NOT_MEASURE, not_seen, m, limits)
    worst = max(slopes, key=lambda g: slopes[g])
    return Decision(Gate.SOAK, Verdict.PASSED, f"{figures}, GPU memory {slopes[worst]:+.0f} MiB/h{_on_gpu(worst)}",
                    m, limits)


def _on_gpu(gpu: str) -> str:
    return f" on GPU {gpu}" if gpu else ""


_JUDGES: dict[Gate, Callable[[Outcome, Policy, dict[str, Any]], Decision]] = {
    Gate.ANSIBLE: _by_the_action(Gate.ANSIBLE),
    Gate.TESTINFRA: _by_the_action(Gate.TESTINFRA),
    Gate.SLO: _judge_slo,
    Gate.SOAK: _judge_soak,
}
