"""Is a canary's latency worse than its baseline's? Two-sample statistics for the gate judge.

Pure and standard library only. The baseline is measured in the same interval as the candidate (the host's own
figures before its drain, or hosts of its pool still on the old bundle), so both see the same traffic and only
the bundle differs. As in Kayenta's Mann-Whitney classifier and Argo Rollouts' analysis, the question is one-sided:
is the candidate slower than the baseline by more than the tolerated relative regression? Two tests answer it:

* the bulk: a one-sided Mann-Whitney U test of the candidate against the baseline scaled by (1 + tolerance),
  H1 "candidate stochastically larger". It sees a whole distribution moving, not a thin tail.
* the tail: a seeded bootstrap confidence interval of the q-quantile's relative change (Q_c - Q_b) / Q_b.

Assumptions: samples are independent draws (requests, not overlapping windows), latencies are finite and >= 0,
and nothing but the bundle differs between the two groups. See `compare` for the verdict rules.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

BOOTSTRAP_RESAMPLES = 2000
MIN_U_SAMPLES = 20  # per side: below this the U statistic's normal approximation is not trusted
Verdict = Literal["same", "worse", "inconclusive"]


def quantile(values: Iterable[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default, "type 7")."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no values")
    return _quantile_sorted(ordered, q)


def _quantile_sorted(ordered: Sequence[float], q: float) -> float:
    h = (len(ordered) - 1) * q
    k = math.floor(h)
    if k + 1 >= len(ordered):
        return ordered[-1]
    return ordered[k] + (h - k) * (ordered[k + 1] - ordered[k])


def samples_for_quantile(q: float, confidence: float) -> int:
    """The fewest samples whose maximum is an upper bound of the q-quantile at `confidence`.

    The maximum of n independent samples lies below the q-quantile with probability q**n, so it bounds the
    quantile once 1 - q**n >= confidence: n = ceil(ln(1 - confidence) / ln(q)), whatever the distribution.
    A P99 at 95 % needs 299 samples: a P99 needs hundreds of samples, not 40.
    """
    _check_probability("q", q)
    _check_probability("confidence", confidence)
    return math.ceil(math.log(1 - confidence) / math.log(q) - 1e-9)  # 1e-9: no extra sample for rounding error


@dataclass(frozen=True)
class Comparison:
    """A candidate's latency samples against its baseline's; the figures are None where not computed."""

    verdict: Verdict
    p_value: float | None  # one-sided Mann-Whitney U, candidate vs baseline * (1 + tolerance)
    u_statistic: float | None  # candidate's U: pairs where it is larger (ties count half)
    quantile_candidate: float | None
    quantile_baseline: float | None
    relative_change: float | None  # (Q_c - Q_b) / Q_b
    ci_low: float | None  # bootstrap interval of relative_change at `confidence`
    ci_high: float | None
    n_candidate: int
    n_baseline: int
    needed: int  # samples each side needs for the quantile rule
    reason: str
    q: float = 0.99  # what was asked, journaled with the answer
    tolerance: float = 0.2
    confidence: float = 0.95

    def figures(self) -> dict[str, Any]:
        """As journaled: JSON-ready (an infinite bound, from a baseline quantile of 0, becomes None)."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


def compare(candidate: Iterable[float], baseline: Iterable[float], *, q: float = 0.99, tolerance: float = 0.2,
            confidence: float = 0.95, min_samples: int | None = None, seed: int = 0) -> Comparison:
    """Is the candidate's latency worse than the baseline's by more than `tolerance` (0.2: 20 % slower)?

    With alpha = 1 - confidence, each of the two tests runs at alpha / 2 (Bonferroni), so that a candidate
    exactly at the tolerance is called worse at most about alpha of the time (the bootstrap is approximate):

    * worse: the U test is significant (p < alpha / 2; both sides have MIN_U_SAMPLES), or both sides have
      `needed` samples and the lower bound of the quantile's interval (its alpha / 2 percentile) is above
      the tolerance. Either is a regression an SRE rolls back: the bulk moved, or the tail did. A plain
      shift is caught early by the U test; a tail (say the top 5 % three times slower) only by the quantile.
    * same: both sides have `needed` samples, the U test is not significant, and the interval's upper bound
      is at or below the tolerance: the quantile is shown to be within it.
    * inconclusive, otherwise: too few samples (never a pass on them), a quantile interval that straddles the
      tolerance, or a baseline quantile of 0 (no relative change). "Not shown worse" is not a pass.

    `needed` is `min_samples`, by default `samples_for_quantile(q, confidence)` (299 for a P99 at 95 %).
    The interval is the percentile interval of BOOTSTRAP_RESAMPLES replicates drawn from random.Random(seed),
    so the same samples and seed give the same answer. Never raises on few or no samples; raises ValueError
    on a value that is not a latency (a bug upstream, not a measurement) or on bad parameters.
    """
    _check_probability("q", q)
    _check_probability("confidence", confidence)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, not {tolerance}")
    cand, base = _latencies("candidate", candidate), _latencies("baseline", baseline)
    needed = min_samples if min_samples is not None else samples_for_quantile(q, confidence)
    alpha, label = 1 - confidence, f"p{q * 100:g}"
    qc = _quantile_sorted(cand, q) if cand else None
    qb = _quantile_sorted(base, q) if base else None
    rel = (qc - qb) / qb if qc is not None and qb else None
    p = u = lo = hi = None
    if len(cand) >= MIN_U_SAMPLES and len(base) >= MIN_U_SAMPLES:
        u, p = _mann_whitney_greater(cand, [b * (1 + tolerance) for b in base])
    enough = len(cand) >= needed and len(base) >= needed
    if enough and rel is not None:
        lo, hi = _bootstrap_interval(cand, base, q, confidence, random.Random(seed))

    def result(verdict: Verdict, why: str) -> Comparison:
        figures = _describe(label, qc, qb, rel, lo, hi, confidence, p, alpha)
        return Comparison(verdict, p, u, qc, qb, rel, lo, hi, len(cand), len(base), needed,
                          f"{figures}: {why}" if figures else why, q, tolerance, confidence)

    tolerated = f"the {tolerance * 100:g} % tolerated"
    shifted, tail = p is not None and p < alpha / 2, lo is not None and lo > tolerance
    if shifted and tail:
        return result("worse", f"worse than {tolerated}")
    if tail:
        return result("worse", f"its {label} is worse than {tolerated}")
    if shifted:
        early = "" if enough else f" already on {len(cand)} samples"
        return result("worse", f"shifted as a whole beyond {tolerated}{early}: worse")
    if hi is not None:
        if hi <= tolerance:
            return result("same", f"within {tolerated}")
        return result("inconclusive", f"the interval straddles {tolerated}: inconclusive")
    if not cand or not base:
        return result("inconclusive", f"no {'candidate' if not cand else 'baseline'} samples: inconclusive")
    if not enough:
        return result("inconclusive", f"{len(cand)} candidate and {len(base)} baseline samples, a {label} at "
                                      f"{confidence * 100:g} % needs {needed} of each: inconclusive")
    return result("inconclusive", f"baseline {label} is 0 ms, no relative change: inconclusive")


def more_samples_needed(comparison: Comparison) -> int:
    """How many more candidate samples should make an inconclusive comparison decidable; 0 when it is decided,
    or when more candidate samples alone cannot decide it (the baseline is short, noisy, or its quantile 0).

    Short of `needed`: the difference. With an interval straddling the tolerance: an estimate, from the
    interval's half-width w on the tolerance's side, of when it would clear the tolerance, taking
    w**2 = s**2 * (1/n_candidate + 1/n_baseline), both sides equally noisy per sample (the same shape of
    distribution), and the relative change staying where it is. The caller bounds what it samples anyway.
    """
    c = comparison
    if c.verdict != "inconclusive" or c.n_baseline < c.needed:
        return 0
    if c.n_candidate < c.needed:
        return c.needed - c.n_candidate
    rel, low, high = c.relative_change, c.ci_low, c.ci_high
    if rel is None or low is None or high is None:
        return 0
    half_width = rel - low if rel > c.tolerance else high - rel
    per_sample = half_width ** 2 / (1 / c.n_candidate + 1 / c.n_baseline)  # s**2
    room = (rel - c.tolerance) ** 2 / per_sample - 1 / c.n_baseline  # what 1 / n_candidate may be
    return max(1, math.ceil(1 / room) - c.n_candidate) if room > 0 else 0


def _mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """U of x and the one-sided p-value of H1 "x stochastically larger than y".

    Normal approximation with mid-ranks for ties, the tie-corrected variance and a continuity correction
    (as scipy.stats.mannwhitneyu(method="asymptotic", alternative="greater")).
    """
    n1, n2 = len(x), len(y)
    pooled = sorted([(v, True) for v in x] + [(v, False) for v in y])
    rank_sum_x = ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        mid_rank = (i + 1 + j) / 2  # ranks i+1..j share their mean
        rank_sum_x += mid_rank * sum(1 for _, is_x in pooled[i:j] if is_x)
        ties += (j - i) ** 3 - (j - i)
        i = j
    u = rank_sum_x - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:  # every value equal: no evidence either way
        return u, 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return u, 0.5 * math.erfc(z / math.sqrt(2))


def _bootstrap_interval(cand: Sequence[float], base: Sequence[float], q: float, confidence: float,
                        rng: random.Random) -> tuple[float, float]:
    """Percentile interval, at `confidence`, of (Q_c* - Q_b*) / Q_b* over BOOTSTRAP_RESAMPLES resamples."""
    draw_c, draw_b = _resampled_quantile(cand, q, rng), _resampled_quantile(base, q, rng)
    changes = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        qc, qb = draw_c(), draw_b()
        changes.append((qc - qb) / qb if qb else (math.inf if qc else 0.0))
    changes.sort()
    alpha = 1 - confidence
    return _quantile_sorted(changes, alpha / 2), _quantile_sorted(changes, 1 - alpha / 2)


def _resampled_quantile(ordered: Sequence[float], q: float, rng: random.Random) -> Callable[[], float]:
    """Draws the q-quantile of a bootstrap resample (n draws with replacement) of `ordered`, without the resample.

    A resample is ordered[floor(n * U_i)] for n uniforms U_i, so its (k+1)-th smallest value is
    ordered[floor(n * U_(k+1))], and the uniforms' order statistics have known laws: U_(k+1) ~ Beta(k+1, n-k),
    and the next one is the least of the n-k-1 uniforms left above it. Same law as resampling and sorting,
    at two random draws instead of n draws and a sort.
    """
    n, h = len(ordered), (len(ordered) - 1) * q
    k = math.floor(h)
    weight, last = h - k, n - 1  # weight 0 when h is a rank, and so when k is the last one
    beta, uniform, above = rng.betavariate, rng.random, 1 / max(1, n - k - 1)

    def draw() -> float:
        u = beta(k + 1, n - k)
        low = ordered[min(last, int(u * n))]
        if weight == 0:
            return low
        u_next = u + (1 - u) * (1 - uniform() ** above)  # the least of the n-k-1 above: 1 - V**(1/(n-k-1))
        return low + weight * (ordered[min(last, int(u_next * n))] - low)

    return draw


def _latencies(name: str, values: Iterable[float]) -> list[float]:
    floats = [float(v) for v in values]
    bad = [v for v in floats if not (v >= 0 and math.isfinite(v))]  # NaN fails v >= 0
    if bad:
        raise ValueError(f"{name}: {len(bad)} values are not latencies in ms (negative, NaN or infinite): {bad[:3]}")
    return sorted(floats)


def _check_probability(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be strictly between 0 and 1, not {value}")


def _describe(label: str, qc: float | None, qb: float | None, rel: float | None, lo: float | None,
              hi: float | None, confidence: float, p: float | None, alpha: float) -> str:
    """'p99 312.0 ms vs baseline 101.5 ms (+207 %, 95 % CI +150 %..+260 %), Mann-Whitney p=0.0001 < 0.025'."""
    if qc is None or qb is None:
        return ""
    text = f"{label} {qc:.1f} ms vs baseline {qb:.1f} ms"
    if rel is not None:
        interval = "" if lo is None or hi is None else \
            f", {confidence * 100:g} % CI {lo * 100:+.0f} %..{hi * 100:+.0f} %"
        text += f" ({rel * 100:+.0f} %{interval})"
    if p is not None:
        text += f", Mann-Whitney p={p:.2g} {'<' if p < alpha / 2 else '>='} {alpha / 2:g}"
    return text
