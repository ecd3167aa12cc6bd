"""The converged study's statistics against values worked out by hand.

Student t quantiles used below (df = 4): t(0.95) = 2.131847, t(0.975) = 2.776445; F(0.975; 3, 3) = 15.43918.
For df = 4 the t distribution function has the closed form F(t) = 1/2 + 3/8 u (1 - v / 12) with
u = t / sqrt(1 + t^2 / 4), v = t^2 / (1 + t^2 / 4).
"""

from __future__ import annotations

import math
import statistics

import pytest

from bert_accum.study import stats

T95_4, T975_4, F975_3_3 = 2.131847, 2.776445, 15.43918


def _t4_sf(t: float) -> float:
    u, v = t / math.sqrt(1 + t * t / 4), t * t / (1 + t * t / 4)
    return 1 - (0.5 + 3 / 8 * u * (1 - v / 12))


def test_tost_equivalent_when_the_90_percent_interval_is_inside_the_margin():
    # mean 0.001, sd sqrt(2.5e-6) = 0.00158114, se 0.000707107
    r = stats.tost([0.002, -0.001, 0.003, 0.000, 0.001], margin=0.01)
    se = math.sqrt(2.5e-6) / math.sqrt(5)
    assert (r.n, r.mean, r.sd) == (5, pytest.approx(0.001), pytest.approx(math.sqrt(2.5e-6)))
    assert (r.ci90_low, r.ci90_high) == (pytest.approx(0.001 - T95_4 * se, abs=1e-8), pytest.approx(0.001 + T95_4 * se, abs=1e-8))
    assert (r.ci95_low, r.ci95_high) == (pytest.approx(0.001 - T975_4 * se, abs=1e-8), pytest.approx(0.001 + T975_4 * se, abs=1e-8))
    assert r.p_lower == pytest.approx(_t4_sf(0.011 / se), abs=1e-9)
    assert r.p_upper == pytest.approx(_t4_sf(0.009 / se), abs=1e-9)   # P(T <= -0.009/se) by symmetry
    assert r.p == max(r.p_lower, r.p_upper) < 0.05 and r.verdict == "equivalent"
    # the smallest margin it would pass: the interval's far end, 0.001 + 2.131847 * 0.000707107
    assert r.bound == pytest.approx(0.001 + T95_4 * se, abs=1e-8) and r.as_dict()["bound"] == r.bound


def test_tost_different_when_the_95_percent_interval_excludes_zero():
    # mean 0.025, sd sqrt(62.5e-6) = 0.00790569, se 0.00353553: 95% CI [0.01518, 0.03482]
    r = stats.tost([0.02, 0.03, 0.025, 0.035, 0.015], margin=0.01)
    assert r.ci95_low == pytest.approx(0.025 - T975_4 * 0.00353553, abs=1e-7) and r.ci95_low > 0
    assert r.verdict == "different"


def test_tost_not_shown_equivalent_when_the_interval_straddles_the_margin_and_zero():
    # mean 0, sd sqrt(2.5e-4) = 0.0158114, se 0.00707107: 90% CI +-0.0150746 reaches past +-0.01
    r = stats.tost([0.01, -0.01, 0.02, -0.02, 0.0], margin=0.01)
    assert r.ci90_high == pytest.approx(T95_4 * 0.00707107, abs=1e-7)
    assert r.p_lower == pytest.approx(r.p_upper) and r.p_lower == pytest.approx(_t4_sf(0.01 / 0.00707107), abs=1e-7)
    assert r.verdict == "not shown equivalent"
    # equivalence would have needed a margin of +-0.0150746 or more, above the +-0.01 fixed beforehand
    assert r.bound == pytest.approx(T95_4 * 0.00707107, abs=1e-7) and r.bound > r.margin


def test_tost_edge_cases_zero_spread_and_too_few_pairs():
    assert stats.tost([0.0, 0.0, 0.0], margin=0.01).verdict == "equivalent"     # exact reproduction
    assert stats.tost([0.02, 0.02, 0.02], margin=0.01).verdict == "different"
    assert stats.tost([0.003], margin=0.01).verdict == "not decidable"
    assert stats.tost([0.001, 0.002], margin=float("nan")).verdict == "not decidable"


def test_gated_verdict_never_claims_below_the_required_number_of_pairs():
    assert stats.gated_verdict("equivalent", 3, 10) == "not yet decidable (n = 3 of 10)"
    assert stats.gated_verdict("equivalent", 10, 10) == "equivalent"


def test_spread_against_the_floor_by_hand():
    pairs, floor = [1.0, -1.0, 2.0, -2.0], [0.5, -0.5, 1.0, -1.0]
    s = stats.spread(pairs, floor)
    # variances 10/3 and 2.5/3: ratio 4; 95% F interval [4 / F(0.975; 3, 3), 4 * F(0.975; 3, 3)]
    assert s.var_ratio == pytest.approx(4.0)
    assert (s.var_ratio_low, s.var_ratio_high) == (pytest.approx(4 / F975_3_3, rel=1e-5), pytest.approx(4 * F975_3_3, rel=1e-5))
    # Brown-Forsythe: |deviations from the median| 1,1,2,2 and 0.5,0.5,1,1; group means 1.5, 0.75 around 1.125:
    # SSB = 8 * 0.375^2 = 1.125, SSW = 1 + 0.25 = 1.25, F = 1.125 / (1.25 / 6) = 5.4 on (1, 6) df;
    # F(1, 6) = T6^2, and P(|T6| >= sqrt(5.4)) lies between 0.05 (t = 2.4469) and 0.10 (t = 1.9432)
    from scipy import stats as sps

    assert s.brown_forsythe_p == pytest.approx(float(sps.f.sf(5.4, 1, 6)))
    assert 0.05 < s.brown_forsythe_p < 0.10
    assert s.t_p == 1.0 and s.wilcoxon_p == pytest.approx(1.0)
    assert stats.reading(s) == "same spread, zero mean: a dropout re-seed (variance, not bias)"


def test_pitman_morgan_by_hand_and_by_its_definition():
    """Paired differences that share their (E, 1) runs: equal variances iff x + y and x - y are uncorrelated; the
    interval is the set of ratios lambda whose test of x + sqrt(lambda) y against x - sqrt(lambda) y keeps p >= 5%."""
    from scipy import stats as sps

    # proportional samples (y = x / 2): the ratio is exactly 4, with no uncertainty left
    p, lo, hi = stats.pitman_morgan([1.0, -1.0, 2.0, -2.0], [0.5, -0.5, 1.0, -1.0])
    assert p == pytest.approx(0.0, abs=1e-12) and (lo, hi) == (pytest.approx(4.0), pytest.approx(4.0))
    # uncorrelated, equal variances: p = 1; K = 1 + t(0.975; 2)^2 and the interval [K - sqrt(K^2 - 1), K + ...]
    p, lo, hi = stats.pitman_morgan([1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0])
    k = 1 + 4.302652729911275 ** 2
    assert p == pytest.approx(1.0) and hi == pytest.approx(k + math.sqrt(k * k - 1)) and lo * hi == pytest.approx(1.0)
    x, y = [0.3, -0.1, 0.5, -0.4, 0.2], [0.1, 0.05, 0.2, -0.3, -0.1]
    p, lo, hi = stats.pitman_morgan(x, y)
    def corr_p(lam: float) -> float:
        return float(sps.pearsonr([a + math.sqrt(lam) * b for a, b in zip(x, y)],
                                  [a - math.sqrt(lam) * b for a, b in zip(x, y)]).pvalue)
    assert p == pytest.approx(corr_p(1.0))
    assert corr_p(lo) == pytest.approx(0.05, abs=1e-9) and corr_p(hi) == pytest.approx(0.05, abs=1e-9)
    assert lo < statistics.variance(x) / statistics.variance(y) < hi
    assert all(math.isnan(v) for v in stats.pitman_morgan([0.1, 0.2], [0.3, 0.1]))  # n - 2 = 0 degrees of freedom
    # paired spread: the interval and equal-spread p are Pitman-Morgan's, the independent ones stay for the CSV
    s = stats.spread(x, y, paired=True)
    assert s.paired and s.equal_spread_p == pytest.approx(p) and (s.var_ratio_low, s.var_ratio_high) == (lo, hi)
    assert s.brown_forsythe_p == stats.brown_forsythe_p(x, y)
    assert not stats.spread(x, y).paired and stats.spread(x, y).equal_spread_p == s.brown_forsythe_p
    with pytest.raises(ValueError):
        stats.spread(x, y[:4], paired=True)


def test_zero_mean_tests_by_hand():
    d = [1.0, 2.0, 3.0, 4.0, 5.0]
    # t = 3 / (sqrt(2.5) / sqrt(5)) = sqrt(18); two-sided p = 2 P(T4 >= sqrt(18))
    assert stats.t_p(d) == pytest.approx(2 * _t4_sf(math.sqrt(18)), abs=1e-9)
    # all five differences positive: W- = 0, exact two-sided p = 2 / 2^5
    assert stats.wilcoxon_p(d) == pytest.approx(2 / 32)
    s = stats.spread(d, [0.1, -0.1, 0.2, -0.2])
    assert stats.reading(s) == "nonzero mean (bias)"
    assert math.isnan(stats.wilcoxon_p([0.0, 0.0]))


def test_a_wider_spread_than_the_floor_is_not_read_as_a_reseed():
    s = stats.spread([10.0, -10.0, 20.0, -20.0, 0.0, 15.0, -15.0], [0.1, -0.1, 0.2, -0.2, 0.0, 0.15, -0.15])
    assert s.var_ratio == pytest.approx(10000.0) and s.var_ratio_low > 1
    assert stats.reading(s) == "larger spread than the dropout floor"
    exact = stats.spread([0.0, 0.0, 0.0], [0.1, -0.1, 0.2, -0.2])
    assert exact.var_ratio == 0.0 and stats.reading(exact) == "smaller spread than the dropout floor"
    assert stats.reading(stats.spread([1.0], [1.0, 2.0])) == "not decidable"


def test_disagreement_and_trivial_baseline():
    assert stats.disagreement([0, 1, 1, 0], [0, 0, 1, 1], regression=False) == 0.5
    assert stats.disagreement([1.0, 2.0, 3.0], [1.0, 2.0, 5.0], regression=True) == pytest.approx(math.sqrt(4 / 3))
    with pytest.raises(ValueError):
        stats.disagreement([0, 1], [0], regression=False)
    assert stats.majority_rate([0, 1, 1, 1]) == 0.75
    assert stats.failed(0.75, 0.75) and stats.failed(float("nan"), 0.5) and not stats.failed(0.76, 0.75)
    assert stats.failed(-0.1, 0.0) and not stats.failed(0.3, float("nan"))


def test_trivial_baseline_per_metric():
    labels = [0, 1, 1, 1]
    assert stats.trivial_baseline("accuracy", labels) == 0.75
    assert stats.trivial_baseline("f1", labels) == pytest.approx(2 * 0.75 / 1.75)
    assert stats.trivial_baseline("pearson", None) == 0.0 and stats.trivial_baseline("matthews_correlation", None) == 0.0
    assert math.isnan(stats.trivial_baseline("accuracy", None)) and math.isnan(stats.trivial_baseline("masked_accuracy", labels))


def test_brown_forsythe_is_undefined_for_two_values_per_sample():
    """Two values: both deviations from the median are equal, so the test has no within-sample spread to use."""
    assert math.isnan(stats.brown_forsythe_p([0.1, 0.2], [0.3, 0.5]))
    assert stats.brown_forsythe_p([0.1, 0.1], [0.2, 0.2]) == 1.0  # both constant: nothing differs
    assert 0 < stats.brown_forsythe_p([0.1, 0.2, 0.4], [0.3, 0.5, 0.55]) <= 1


def test_a_mean_shared_with_the_floor_is_no_bias():
    """Pair and floor differences both measured from the same (E, 1) runs: a shift both share (a lucky reference)
    is not a bias once the mean is tested against the floor's, seed by seed."""
    diffs = [-0.005 + 0.001 * k for k in (-2, -1, 0, 1, 2, -2, -1, 0, 1, 2)]
    floor = [d + 0.0003 * (-1) ** k for k, d in enumerate(diffs)]
    sp = stats.spread(diffs, floor)
    assert sp.t_p < 0.05 and stats.reading(sp).startswith("nonzero mean")
    matched = [d - f for d, f in zip(diffs, floor)]
    assert stats.reading(sp, vs_floor_p=stats.t_p(matched)) == (
        "the floor's spread and mean: a dropout re-seed (variance, not bias)")
    shifted = [m + 0.002 for m in matched]  # (B, N) 0.002 above the floor run of every seed
    assert stats.reading(sp, vs_floor_p=stats.t_p(shifted)) == "nonzero mean against the dropout floor's (bias)"
