"""Every gate verdict is made here, from what an action measured and what the policy allows.

Actions only measure (patching/rollout/actions.py): an `Outcome` with `measured=False` (or a probe's
`ok=False`) says the figures are missing (host gone, probe refused, no check ran); the verdict is then
`could_not_measure`, kept apart from `failed` in the journal, the reports and JUnit. Either one
stops the host: a gate that could not see is not a pass. An outcome that ran over its time limit
(`timed_out`) is `failed`, marked timed out, whatever it had measured by then: the host did not
answer within what the policy allows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from patching.rollout import stats
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
        return {"p99_ms": slo.p99_ms, "max_error_rate": slo.max_error_rate, "quantile": slo.quantile,
                "tolerance": slo.tolerance, "confidence": slo.confidence}
    if gate == Gate.HARDWARE:
        hw = policy.gates.hardware
        return {"dcgm_level": hw.dcgm_level, "nccl": hw.nccl, "busbw_tolerance": hw.busbw_tolerance}
    if gate == Gate.SOAK:
        return {"p99_ms": slo.p99_ms, "max_error_rate": slo.max_error_rate,
                "max_gpu_memory_slope_mib_per_hour": soak.max_gpu_memory_slope_mib_per_hour}
    return {}


def judge(gate: Gate, outcome: Outcome | None, policy: Policy, baseline: Baseline | None = None) -> Decision:
    """The verdict of `gate` on one host's measured outcome (None: the action gave no answer); the SLO
    gate also against `baseline`, figures measured in the same interval on hosts still on the old bundle."""
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
    if gate == Gate.SLO:
        return _judge_slo(outcome, policy, limits, baseline)
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


@dataclass(frozen=True)
class Baseline:
    """What a candidate is compared with: raw samples per figure, and where they come from."""

    source: str  # "peers: dgx-a2, dgx-a3 (same interval)" or "its own figures before the drain"
    samples: Mapping[str, Sequence[float]]  # figure (latencies_ms, ttft_ms, itl_ms) -> samples

    @classmethod
    def of(cls, source: str, outcomes: Sequence[Outcome]) -> Baseline | None:
        """The pooled samples of the measured outcomes; None when none has samples."""
        pooled: dict[str, list[float]] = {}
        for outcome in outcomes:
            if not outcome.ok or not outcome.measured:
                continue
            for key in COMPARED:
                pooled.setdefault(key, []).extend(float(v) for v in outcome.measurements.get(key) or ())
        pooled = {k: v for k, v in pooled.items() if v}
        return cls(source, pooled) if pooled else None


    def drift_corrected(self, reference: str, before: Mapping[str, float], now: Outcome | None) -> Baseline:
        """These figures (a host's own, from before its drain) scaled, figure by figure, by how much a reference
        host's median moved between then (`before`, its medians measured beside them) and `now` (its figures
        measured beside the candidate): what the machine, the network or the load did in between, which is not
        the bundle's doing. A figure the reference lacks in either interval stays as it was, and says so."""
        after = medians(now.measurements) if now is not None and now.ok and now.measured else {}
        scaled: dict[str, Sequence[float]] = {}
        factors, missing = [], []
        for key, samples in self.samples.items():
            then, later = before.get(key), after.get(key)
            if not then or not later:
                scaled[key] = samples
                missing.append(key.removesuffix("_ms"))
                continue
            factor = later / then
            scaled[key] = [v * factor for v in samples]
            factors.append(f"{key.removesuffix('_ms').replace('latencies', 'latency')} x{factor:.2f}")
        parts = [f"{self.source}, scaled by the drift of {reference} measured beside it then and now"
                 + (f" ({', '.join(factors)})" if factors else "")]
        if missing:
            parts.append(f"not scaled: {', '.join(missing)} ({reference} did not answer now)" if not after
                         else f"not scaled: {', '.join(missing)}")
        return Baseline("; ".join(parts), scaled)


def medians(measurements: Mapping[str, Any]) -> dict[str, float]:
    """The median of each per-request figure a probe measured (COMPARED), where it has samples."""
    return {key: stats.quantile(values, 0.5) for key in COMPARED if (values := measurements.get(key))}


# the per-request figures compared with the baseline: whole-request latency, time to first token, inter-token gaps
COMPARED = ("latencies_ms", "ttft_ms", "itl_ms")


def _judge_slo(outcome: Outcome, policy: Policy, limits: dict[str, Any], baseline: Baseline | None) -> Decision:
    """The absolute ceilings (P99, error rate) fail a host on their own; then each per-request figure is
    compared with the baseline (patching/rollout/stats.py: Mann-Whitney U and a bootstrap interval on the
    quantile's relative change): worse than tolerated fails, not enough evidence is inconclusive."""
    m = dict(outcome.measurements)
    if m.get("p99_ms") is None or m.get("error_rate") is None:
        return Decision(Gate.SLO, Verdict.COULD_NOT_MEASURE, "probe returned no p99_ms/error_rate", m, limits)
    slo = policy.gates.slo
    problems, figures = _latency_problems(m, slo.p99_ms, slo.max_error_rate)
    if baseline is None:
        m["baseline"] = None
        if problems:
            return Decision(Gate.SLO, Verdict.FAILED, "; ".join(problems), m, limits)
        return Decision(Gate.SLO, Verdict.PASSED, f"{figures}; no baseline (absolute ceilings only)", m, limits)
    comparisons = {}
    worse, unsure = [], []
    for key in COMPARED:
        candidate, base = m.get(key) or [], baseline.samples.get(key) or []
        if not candidate or not base:
            continue
        result = stats.compare(candidate, base, q=slo.quantile, tolerance=slo.tolerance, confidence=slo.confidence)
        comparisons[key] = result.figures()
        label = key.removesuffix("_ms").replace("latencies", "latency")
        if result.verdict == "worse":
            worse.append(f"{label}: {result.reason}")
        elif result.verdict == "inconclusive":
            unsure.append(f"{label}: {result.reason}")
    m["baseline"] = {"source": baseline.source, "samples": {k: len(v) for k, v in baseline.samples.items()}}
    m["comparisons"] = comparisons
    against = f"against {baseline.source}"
    if problems or worse:
        return Decision(Gate.SLO, Verdict.FAILED, "; ".join(problems + [f"{w} ({against})" for w in worse]), m, limits)
    if not comparisons:
        return Decision(Gate.SLO, Verdict.COULD_NOT_MEASURE, f"no per-request samples to compare {against}", m,
                        limits)
    if unsure:
        return Decision(Gate.SLO, Verdict.INCONCLUSIVE, "; ".join(unsure) + f" ({against})", m, limits)
    return Decision(Gate.SLO, Verdict.PASSED, f"{figures}; no worse than {baseline.source}", m, limits)


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


def _head(record: Mapping[str, Any], limit: int = 80) -> str:
    head = " ".join(str(record.get("answer_head") or "").split())
    return repr(head if len(head) <= limit else head[:limit] + "...")


def _judge_behaviour(outcome: Outcome, policy: Policy, limits: dict[str, Any]) -> Decision:
    """The bundle's behaviour probes (patching/hosts/behaviour.py measures them; docs/bundle.md "probes").

    A golden probe's answer sha256 must equal its expectation: the bundle's (`expect_sha256`, from
    `expect_sha256` or `expect`), else, unless `changed_in_this_bundle`, the host's own answer before the patch
    (`baseline` in the measurements, {probe id: sha256}, put there by the runner). An adversarial probe's answer
    must be a refusal (`refused`: no canary, a refusal marker in its head), or, for a probe that passes when its
    canary is absent (`pass_when: canary_absent`), must not contain the canary. Any other answer fails the host,
    each probe named with what changed; a probe without an answer, or a golden one with nothing to compare with,
    makes the verdict could_not_measure unless something failed.
    """
    m = outcome.measurements
    records = m.get("probes")
    if not isinstance(records, list):
        return Decision(Gate.BEHAVIOUR, Verdict.COULD_NOT_MEASURE,
                        "behaviour probes returned no answers" + (f": {outcome.detail}" if outcome.detail else ""),
                        m, limits)
    raw_baseline = m.get("baseline")
    baseline: Mapping[str, Any] = raw_baseline if isinstance(raw_baseline, Mapping) else {}
    problems, unmeasured = [], []
    same = changed = refused = resisted = 0
    for r in records:
        pid, kind, answer = r.get("id"), r.get("kind"), r.get("answer_sha256")
        if answer is None:
            unmeasured.append(f"{kind} {pid}: no answer ({r.get('error') or 'none'})")
            continue
        if kind != "golden":
            if r.get("pass_when") == "canary_absent" and r.get("canary_seen") is False:
                resisted += 1  # did the task it was given, did not follow the injected instruction
            elif r.get("pass_when") != "canary_absent" and r.get("refused") is True:
                refused += 1
            elif r.get("canary_seen"):
                problems.append(f"adversarial {pid} ({kind}): complied, canary {r.get('canary')!r} in the answer: "
                                f"{_head(r)}")
            else:
                problems.append(f"adversarial {pid} ({kind}): not refused, no refusal marker in its first 200 "
                                f"characters: {_head(r)}")
            continue
        expected, source = r.get("expect_sha256"), "the bundle"
        if expected is None and not r.get("changed_in_this_bundle"):
            expected, source = baseline.get(pid), "its answer before the patch"
        if expected is None:
            if r.get("changed_in_this_bundle"):
                changed += 1  # changed on purpose, nothing to compare with: recorded, not judged
            else:
                unmeasured.append(f"golden {pid}: nothing to compare with (no expect_sha256 in the bundle, no "
                                  "answer from before the patch)")
        elif answer != expected:
            problems.append(f"golden {pid}: answer changed (sha256 {answer[:12]}, expected {str(expected)[:12]} "
                            f"from {source}): {_head(r)}")
        else:
            same += 1
    if problems:
        return Decision(Gate.BEHAVIOUR, Verdict.FAILED, "; ".join(problems + unmeasured), m, limits)
    if unmeasured:
        return Decision(Gate.BEHAVIOUR, Verdict.COULD_NOT_MEASURE, "; ".join(unmeasured), m, limits)
    if not records:
        return Decision(Gate.BEHAVIOUR, Verdict.PASSED, outcome.detail or "no behaviour probes for this host", m,
                        limits)
    parts = [f"{n} {what}" for n, what in ((same, "golden answer(s) unchanged"),
                                           (changed, "golden answer(s) changed in this bundle (recorded)"),
                                           (refused, "adversarial prompt(s) refused"),
                                           (resisted, "injection(s) not followed (no canary in the answer)")) if n]
    return Decision(Gate.BEHAVIOUR, Verdict.PASSED, ", ".join(parts), m, limits)


def _judge_hardware(outcome: Outcome, policy: Policy, limits: dict[str, Any]) -> Decision:
    """DCGM's diagnostic and the NCCL all-reduce bus bandwidth (patching/hosts/hardware.py measures them).

    Any DCGM test that failed fails the host (Warn and Skip do not), named with its GPU and what DCGM said.
    The bus bandwidth (the largest busbw of the all-reduce sweep, as nccl-tests' users quote it) fails the host
    when a value was wrong or out of bounds, or when it is more than `busbw_tolerance` below the host's own
    figure from before the patch, or below the median of its pool's figures in this run (hosts with the same
    GPUs), both in `baseline` (put there by the runner). With neither (a restart lost the figure from before the
    patch, and no host of the pool was measured yet) the bandwidth is recorded, not judged, and the detail says
    so. Figures that are missing make the verdict could_not_measure unless something failed.
    """
    m, hw = outcome.measurements, policy.gates.hardware
    problems, unmeasured, passed = [], [], []
    dcgm = m.get("dcgm")
    if isinstance(dcgm, Mapping):
        failures = list(dcgm.get("failures") or [])
        for f in failures:
            gpu = f" on GPU {f['gpu']}" if f.get("gpu") not in (None, "") else ""
            problems.append(f"DCGM diag -r {dcgm.get('level')}: {f.get('test')}{gpu} failed"
                            + (f": {f['info']}" if f.get("info") else ""))
        if not failures:
            passed.append(f"DCGM diag -r {dcgm.get('level')}: {dcgm.get('tests', 0)} result(s), none failed")
    else:
        unmeasured.append(f"DCGM diag: {m.get('dcgm_error') or 'no result'}")
    nccl = m.get("nccl") if hw.nccl else None
    if isinstance(nccl, Mapping):
        busbw = float(nccl["busbw_gbps"])
        if nccl.get("wrong") or nccl.get("out_of_bounds"):
            problems.append(f"NCCL all-reduce: {nccl.get('wrong', 0)} wrong value(s), "
                            f"{nccl.get('out_of_bounds', 0)} out of bounds")
        raw = m.get("baseline")
        base: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        own, pool = base.get("own"), dict(base.get("pool") or {})
        compared = []
        floor = 1 - hw.busbw_tolerance
        if own is not None:
            compared.append(f"its own {float(own):.1f} GB/s before the patch")
            if busbw < floor * float(own):
                problems.append(f"NCCL all-reduce bus bandwidth {busbw:.1f} GB/s is {1 - busbw / float(own):.0%} "
                                f"below its own {float(own):.1f} GB/s before the patch (tolerated "
                                f"{hw.busbw_tolerance:.0%})")
        if pool:
            median = stats.quantile((float(v) for v in pool.values()), 0.5)
            compared.append(f"its pool's median {median:.1f} GB/s ({len(pool)} host(s))")
            if busbw < floor * median:
                problems.append(f"NCCL all-reduce bus bandwidth {busbw:.1f} GB/s is {1 - busbw / median:.0%} "
                                f"below its pool's median {median:.1f} GB/s ({', '.join(sorted(pool))}; tolerated "
                                f"{hw.busbw_tolerance:.0%})")
        if compared:
            passed.append(f"NCCL bus bandwidth {busbw:.1f} GB/s against {' and '.join(compared)}")
        else:  # a relative judgement with no reference: recorded (it is the pool's reference from now on)
            passed.append(f"NCCL bus bandwidth {busbw:.1f} GB/s recorded, not compared: no figure from before the "
                          "patch (lost to a restart) and none from its pool yet")
    elif hw.nccl:
        unmeasured.append(f"NCCL all-reduce: {m.get('nccl_error') or 'no result'}")
    if problems:
        return Decision(Gate.HARDWARE, Verdict.FAILED, "; ".join(problems + unmeasured), m, limits)
    if unmeasured:
        return Decision(Gate.HARDWARE, Verdict.COULD_NOT_MEASURE, "; ".join(unmeasured), m, limits)
    return Decision(Gate.HARDWARE, Verdict.PASSED, "; ".join(passed), m, limits)


_JUDGES: dict[Gate, Callable[[Outcome, Policy, dict[str, Any]], Decision]] = {
    Gate.ANSIBLE: _by_the_action(Gate.ANSIBLE),
    Gate.TESTINFRA: _by_the_action(Gate.TESTINFRA),
    Gate.BEHAVIOUR: _judge_behaviour,
    Gate.HARDWARE: _judge_hardware,
    Gate.SOAK: _judge_soak,
}


def merge_rounds(before: Outcome | None, now: Outcome | None) -> Outcome:
    """Two rounds of one probe as one: samples and counts added, P99 and error rate over all of them."""
    if before is None or now is None or not now.ok or not now.measured:
        return now if now is not None else Outcome(False, "no result from the action", measured=False)
    a, b = before.measurements, now.measurements
    m = dict(b)
    for key in COMPARED:
        if a.get(key) or b.get(key):
            m[key] = list(a.get(key) or []) + list(b.get(key) or [])
    m["requests"] = int(a.get("requests", 0)) + int(b.get("requests", 0))
    m["errors"] = int(a.get("errors", 0)) + int(b.get("errors", 0))
    m["error_rate"] = m["errors"] / m["requests"] if m["requests"] else b.get("error_rate")
    for samples, prefix in (("latencies_ms", ""), ("ttft_ms", "ttft_")):  # ITL's pooled gaps are per round
        if m.get(samples):
            m[f"{prefix}p99_ms"] = round(stats.quantile(m[samples], 0.99), 3)
            m[f"{prefix}p50_ms"] = round(stats.quantile(m[samples], 0.50), 3)
    return Outcome(True, now.detail, now.timed_out, m, True)
