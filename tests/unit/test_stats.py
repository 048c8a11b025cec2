"""patching.rollout.stats judges a canary's latency samples against its baseline like an SRE would: equal
distributions pass (and rarely fail), a slower bulk or a heavier tail fails, too few samples for the quantile is
inconclusive, never a pass. Synthetic, seeded samples only: lognormal latencies around 100 ms."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter

import pytest

from patching.rollout import stats
from patching.rollout.stats import compare, more_samples_needed, quantile, samples_for_quantile

SEEDS = range(50)


def latencies(rng: random.Random, n: int, *, sigma: float = 0.25, scale: float = 1.0) -> list[float]:
    return [scale * rng.lognormvariate(4.6, sigma) for _ in range(n)]


def heavier_tail(values: list[float], *, share: float = 0.05, factor: float = 3.0) -> list[float]:
    """The same bulk, but the slowest `share` of requests `factor` times slower."""
    ordered = sorted(values)
    cut = len(ordered) - round(len(ordered) * share)
    return ordered[:cut] + [factor * v for v in ordered[cut:]]


def verdicts(make_candidate, n: int = 600) -> Counter[str]:
    """Verdicts over SEEDS of a candidate against a baseline of the same size, both drawn fresh per seed."""
    counts: Counter[str] = Counter()
    for seed in SEEDS:
        rng = random.Random(seed)
        baseline = latencies(rng, n)
        counts[compare(make_candidate(rng, n), baseline, seed=seed).verdict] += 1
    return counts


# ---- quantiles and how many samples they need --------------------------------------------------

def test_quantile_interpolates_linearly_like_numpy():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile(range(1, 101), 0.99) == pytest.approx(99.01)
    assert quantile([3.0, 1.0, 2.0], 0) == 1.0 and quantile([3.0, 1.0, 2.0], 1) == 3.0
    assert quantile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


@pytest.mark.parametrize("q, confidence, n", [(0.99, 0.95, 299), (0.95, 0.95, 59), (0.999, 0.95, 2995),
                                              (0.99, 0.99, 459), (0.5, 0.75, 2)])
def test_samples_for_quantile_is_the_fewest_whose_maximum_bounds_it(q, confidence, n):
    assert samples_for_quantile(q, confidence) == n
    assert 1 - q ** n >= confidence - 1e-12 > 1 - q ** (n - 1)


def test_mann_whitney_matches_scipy_asymptotic_greater_with_ties():
    # scipy.stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic"): U=296.5, p=0.012342874490190
    x = [12, 15, 15, 18, 20, 20, 20, 22, 25, 25, 27, 30, 31, 31, 33, 35, 38, 40, 41, 45]
    y = [10, 11, 12, 12, 14, 15, 16, 18, 18, 19, 20, 21, 22, 22, 24, 25, 26, 28, 30, 32, 33]
    u, p = stats._mann_whitney_greater(sorted(map(float, x)), list(map(float, y)))
    assert u == 296.5
    assert p == pytest.approx(0.012342874490190, rel=1e-9)


def test_bootstrap_shortcut_has_the_law_of_resampling_and_sorting():
    rng = random.Random(7)
    values = sorted(latencies(rng, 50))
    draw = stats._resampled_quantile(values, 0.9, rng)  # (n - 1) * q = 44.1: interpolates
    shortcut = sorted(draw() for _ in range(20_000))
    resampled = sorted(quantile(rng.choices(values, k=50), 0.9) for _ in range(20_000))
    for p in (0.025, 0.1, 0.25, 0.5, 0.75, 0.9, 0.975):
        assert quantile(shortcut, p) == pytest.approx(quantile(resampled, p), rel=0.02)


# ---- the verdicts ------------------------------------------------------------------------------

def test_equal_distributions_pass_and_rarely_fail():
    counts = verdicts(lambda rng, n: latencies(rng, n))
    assert counts["worse"] <= 5  # at most 10 % of the seeds, twice the 5 % a 95 % confidence allows
    assert counts["same"] >= 40


def test_a_candidate_exactly_at_the_tolerance_fails_at_most_about_alpha():
    counts = verdicts(lambda rng, n: latencies(rng, n, scale=1.2))
    assert counts["worse"] <= 5
    assert counts["same"] <= 5  # nor is it shown to be within the tolerance


def test_a_heavier_tail_fails_on_the_quantile_though_the_bulk_is_unchanged():
    for seed in range(20):
        rng = random.Random(seed)
        baseline, candidate = latencies(rng, 300), heavier_tail(latencies(rng, 300))
        result = compare(candidate, baseline, seed=seed)
        assert result.verdict == "worse", result.reason
        assert result.p_value is not None and result.p_value > 0.025  # the U test alone would miss it
        assert result.ci_low is not None and result.ci_low > 0.2
        assert "p99 is worse than the 20 % tolerated" in result.reason


def test_twice_as_slow_fails_on_both_tests():
    rng = random.Random(1)
    result = compare(latencies(rng, 300, scale=2.0), latencies(rng, 300))
    assert result.verdict == "worse"
    assert result.p_value is not None and result.p_value < 1e-6
    assert result.ci_low is not None and result.ci_low > 0.2
    assert result.relative_change == pytest.approx(1.0, abs=0.3)
    assert re.fullmatch(r"p99 \d+\.\d ms vs baseline \d+\.\d ms \(\+\d+ %, 95 % CI \+\d+ %\.\.\+\d+ %\), "
                        r"Mann-Whitney p=\S+ < 0\.025: worse than the 20 % tolerated", result.reason)


def test_40_samples_are_inconclusive_for_a_p99_at_95_percent():
    rng = random.Random(2)
    for candidate in (latencies(rng, 40), heavier_tail(latencies(rng, 40))):
        result = compare(candidate, latencies(rng, 40))
        assert result.verdict == "inconclusive"
        assert result.needed == 299 and result.ci_low is None
        assert "needs 299 of each" in result.reason
        assert more_samples_needed(result) == 0  # the baseline is short too: more candidate samples cannot help
    result = compare(latencies(rng, 40), latencies(rng, 300))
    assert result.verdict == "inconclusive" and more_samples_needed(result) == 259


def test_a_clearly_slower_candidate_fails_early_on_the_u_test():
    rng = random.Random(3)
    result = compare(latencies(rng, 40, scale=2.0), latencies(rng, 40))
    assert result.verdict == "worse"
    assert "already on 40 samples" in result.reason


def test_an_interval_straddling_the_tolerance_is_inconclusive_not_a_pass():
    rng = random.Random(4)  # a wide distribution: 300 samples pin its P99 to no better than about +-30 %
    result = compare(latencies(rng, 300, sigma=0.5), latencies(rng, 300, sigma=0.5))
    assert result.verdict == "inconclusive"
    assert result.ci_low is not None and result.ci_high is not None
    assert result.ci_low <= 0.2 < result.ci_high
    assert "straddles the 20 % tolerated" in result.reason


def test_min_samples_overrides_the_quantile_rule():
    rng = random.Random(4)
    result = compare(latencies(rng, 100), latencies(rng, 100), min_samples=100)
    assert result.needed == 100 and result.ci_low is not None


# ---- reproducibility, ties, degenerate input ---------------------------------------------------

def test_the_interval_is_reproducible_with_the_same_seed():
    rng = random.Random(5)
    candidate, baseline = latencies(rng, 400), latencies(rng, 400)
    assert compare(candidate, baseline, seed=11) == compare(candidate, baseline, seed=11)
    other = compare(candidate, baseline, seed=12)
    assert (other.ci_low, other.ci_high) != (compare(candidate, baseline, seed=11).ci_low,
                                             compare(candidate, baseline, seed=11).ci_high)


def test_ties_are_handled():
    rng = random.Random(6)  # whole milliseconds: many ties
    baseline = [round(v) for v in latencies(rng, 600)]
    assert compare([round(v) for v in latencies(rng, 600)], baseline).verdict == "same"
    assert compare([round(v) for v in latencies(rng, 600, scale=2.0)], baseline).verdict == "worse"
    for tolerance in (0.2, 0.0):  # every value equal, even against an unscaled baseline: no variance at all
        same = compare([100.0] * 300, [100.0] * 300, tolerance=tolerance)
        assert same.verdict == "same" and same.p_value == 1.0 and same.ci_low == same.ci_high == 0.0


@pytest.mark.parametrize("candidate, baseline", [
    ([], []), ([], [100.0] * 300), ([100.0] * 300, []), ([100.0], [100.0]), ([100.0], [100.0] * 300),
    ([0.0] * 300, [0.0] * 300),
])
def test_empty_one_sample_or_zero_inputs_are_inconclusive_with_a_reason(candidate, baseline):
    result = compare(candidate, baseline)
    assert result.verdict == "inconclusive"
    assert result.reason.endswith("inconclusive") and "\n" not in result.reason
    json.dumps(result.figures(), allow_nan=False)


@pytest.mark.parametrize("candidate", [[100.0] * 15 + [float("nan")] + [100.0] * 15, [-1.0] + [100.0] * 30,
                                       [float("inf")] * 30])
def test_values_that_are_not_latencies_are_refused(candidate):
    with pytest.raises(ValueError, match="not latencies"):
        compare(candidate, [100.0] * 30)


@pytest.mark.parametrize("kwargs", [{"q": 1.0}, {"q": 0.0}, {"confidence": 1.0}, {"tolerance": -0.1}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        compare([100.0] * 30, [100.0] * 30, **kwargs)


def test_figures_are_json_ready_and_the_comparison_frozen():
    rng = random.Random(8)
    result = compare(latencies(rng, 300), latencies(rng, 300))
    figures = json.loads(json.dumps(result.figures(), allow_nan=False))
    assert figures["verdict"] == result.verdict and figures["n_candidate"] == 300 and figures["q"] == 0.99
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.verdict = "worse"  # type: ignore[misc]


# ---- more samples --------------------------------------------------------------------------------

def test_more_samples_needed():
    rng = random.Random(9)
    decided = compare(latencies(rng, 300, scale=2.0), latencies(rng, 300))
    assert more_samples_needed(decided) == 0
    short_baseline = compare(latencies(rng, 400), latencies(rng, 100))
    assert short_baseline.verdict == "inconclusive" and more_samples_needed(short_baseline) == 0
    assert more_samples_needed(compare([], latencies(rng, 300))) == 299


def test_more_candidate_samples_mostly_decide_a_straddling_interval():
    asked = decided = 0
    for seed in range(10):  # a large, tight baseline: the candidate's 300 samples are the noisy side
        rng = random.Random(seed)
        baseline, candidate = latencies(rng, 5000), latencies(rng, 300, scale=1.08)
        more = more_samples_needed(compare(candidate, baseline, seed=seed))
        if more:
            asked += 1
            again = compare(candidate + latencies(rng, more, scale=1.08), baseline, seed=seed)
            decided += again.verdict != "inconclusive"
    assert asked >= 3
    assert decided >= asked / 2
