"""The converged study's statistics: equivalence (TOST), spread and mean against a noise floor, prediction
disagreement between two runs, and the trivial baseline a failed run falls to.

Every function takes plain lists of numbers and returns plain values, so each can be checked by hand.

Definitions
  * **TOST** (two one-sided tests) on paired differences d_i = metric(B, N) - metric(E, 1) of runs that share
    all three seeds: with mean m, sample sd s, n pairs and se = s / sqrt(n), the 90% interval m +- t(0.95, n-1) se
    is the set of means neither one-sided test at 5% rejects. Verdicts, in this order:
      - ``equivalent``: the 90% interval lies strictly inside (-margin, +margin) (both one-sided tests reject);
      - ``different``: the 95% two-sided t interval excludes 0 (a nonzero mean difference is shown) while
        equivalence is not;
      - ``not shown equivalent``: neither (the data cannot tell a difference inside the margin from one outside);
      - ``not decidable``: fewer than two pairs.
    A difference can thus be nonzero and still ``equivalent`` when it is smaller than the margin; the 95%
    interval is reported beside the verdict so a reader sees both.
  * **Spread against the floor**: the paired differences x_i = (B, N)_i - (E, 1)_i against the dropout-only floor
    differences y_i = floor_i - (E, 1)_i, and the variance ratio s_x^2 / s_y^2. When both are measured from the same
    (E, 1) runs (the headline arm and its floor), x_i and y_i share the reference's noise and are correlated, so
    they are compared seed by seed: the **Pitman-Morgan** test (Var x = Var y exactly when x + y and x - y are
    uncorrelated: a t test of that correlation, n - 2 degrees of freedom) and its interval for the ratio,
    F (K -+ sqrt(K^2 - 1)) with F = s_x^2 / s_y^2, K = 1 + 2 t^2 (1 - r^2) / (n - 2), r the correlation of x and y
    and t the two-sided t quantile (the ratios lambda whose test x + sqrt(lambda) y against x - sqrt(lambda) y is
    not rejected). For an arm measured against its own (E, 1) runs (another reference), the samples are
    independent: Brown-Forsythe test (Levene's test about the median) and the F interval of the ratio.
  * **Zero mean**: one-sample Student t test and Wilcoxon signed-rank test (zero differences dropped, as
    scipy's default ``wilcox`` rule does) of the paired differences.
  * **Disagreement** of two runs' dev predictions: for classification the fraction of dev examples whose
    predicted labels differ; for regression the root mean square difference of the predictions.
  * **Trivial baseline**: the best score of a constant predictor on the dev labels: majority-class accuracy,
    F1 of always predicting the positive class, 0 for a correlation (Pearson, Spearman, Matthews). A run fails
    when its final metric is at or below it, or is not finite.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

NAN = float("nan")
VERDICTS = ("equivalent", "not shown equivalent", "different", "not decidable")


@dataclass(frozen=True)
class Tost:
    """Equivalence of paired differences to zero within +-margin (see the module docstring)."""

    n: int
    mean: float
    sd: float
    margin: float
    ci90_low: float
    ci90_high: float
    ci95_low: float
    ci95_high: float
    p_lower: float
    p_upper: float
    p: float
    verdict: str

    @property
    def bound(self) -> float:
        """The smallest margin this test would call equivalent: the larger |end| of the 90% interval.

        Set beside the margin fixed before the runs it shows how much of a "not shown equivalent" is too few or
        too noisy pairs: the dropout-only floor's own bound is what a mere dropout re-seed can be shown to be."""
        return max(abs(self.ci90_low), abs(self.ci90_high))

    def as_dict(self) -> dict[str, Any]:
        """The fields, and the equivalence bound, as a plain dict."""
        return {**asdict(self), "bound": self.bound}


def _t_tail(t: float, df: int) -> float:
    """P(T >= t) for Student t with df degrees of freedom; t may be +-inf (zero spread)."""
    from scipy import stats

    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    return float(stats.t.sf(t, df))


def _half_width(sd: float, n: int, level: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def _t_stat(diff_from: float, se: float) -> float:
    """(mean - value) / se, with the zero-spread limits: +-inf away from the value, 0 at it."""
    if se > 0:
        return diff_from / se
    return 0.0 if diff_from == 0 else math.copysign(math.inf, diff_from)


def tost(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> Tost:
    """TOST of `diffs` against +-`margin` at level `alpha` per one-sided test (90% interval for 0.05)."""
    d = [float(x) for x in diffs if not math.isnan(x)]
    n = len(d)
    if n < 2 or not margin > 0:
        m = statistics.fmean(d) if d else NAN
        return Tost(n, m, NAN, margin, NAN, NAN, NAN, NAN, NAN, NAN, NAN, "not decidable")
    m, s = statistics.fmean(d), statistics.stdev(d)
    se = s / math.sqrt(n)
    h90, h95 = _half_width(s, n, 1 - 2 * alpha), _half_width(s, n, 1 - alpha)
    p_lower = _t_tail(_t_stat(m + margin, se), n - 1)        # H0: mean <= -margin
    p_upper = _t_tail(-_t_stat(m - margin, se), n - 1)       # H0: mean >= +margin
    lo90, hi90, lo95, hi95 = m - h90, m + h90, m - h95, m + h95
    if -margin < lo90 and hi90 < margin:
        verdict = "equivalent"
    elif lo95 > 0 or hi95 < 0:
        verdict = "different"
    else:
        verdict = "not shown equivalent"
    return Tost(n, m, s, margin, lo90, hi90, lo95, hi95, p_lower, p_upper, max(p_lower, p_upper), verdict)


def gated_verdict(verdict: str, n: int, required: int) -> str:
    """The verdict a report may state: 'not yet decidable (n = k of required)' while fewer pairs than the study
    planned (at least the headline minimum) are in, whatever the statistics say."""
    if n < required:
        return f"not yet decidable (n = {n} of {required})"
    return verdict


@dataclass(frozen=True)
class Spread:
    """Paired differences against floor differences: equal spread and zero mean (see the module docstring)."""

    n: int
    n_floor: int
    mean: float
    sd: float
    floor_mean: float
    floor_sd: float
    var_ratio: float
    var_ratio_low: float
    var_ratio_high: float
    brown_forsythe_p: float
    t_p: float
    wilcoxon_p: float
    floor_t_p: float
    paired: bool = False
    """Compared seed by seed (a shared (E, 1) reference): the ratio's interval and `equal_spread_p` are
    Pitman-Morgan's; otherwise the F interval and Brown-Forsythe."""
    pitman_morgan_p: float = NAN

    @property
    def equal_spread_p(self) -> float:
        """The p of the equal-spread test that fits the samples: Pitman-Morgan when paired, else Brown-Forsythe."""
        return self.pitman_morgan_p if self.paired else self.brown_forsythe_p

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def variance_ratio(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """s_a^2 / s_b^2 and its `level` F interval [F / F_hi, F / F_lo] with (n_a - 1, n_b - 1) degrees of freedom."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return NAN, NAN, NAN
    va, vb = statistics.variance(a), statistics.variance(b)
    if vb == 0:
        return (NAN if va == 0 else math.inf), NAN, NAN
    f = va / vb
    df1, df2 = len(a) - 1, len(b) - 1
    return f, f / float(stats.f.ppf(0.5 + level / 2, df1, df2)), f / float(stats.f.ppf(0.5 - level / 2, df1, df2))


def pitman_morgan(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Paired samples (a_i, b_i): (p of equal variances, low, high of the `level` interval for s_a^2 / s_b^2) by the
    Pitman-Morgan test (see the module docstring); NaN below three pairs or where a variance is 0."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths ({len(a)} vs {len(b)})")
    n = len(a)
    if n < 3:
        return NAN, NAN, NAN
    va, vb = statistics.variance(a), statistics.variance(b)
    if va == 0 or vb == 0:
        return NAN, NAN, NAN
    r2 = min(1.0, statistics.covariance(a, b) ** 2 / (va * vb))
    f = va / vb
    # corr(a + b, a - b) = (va - vb) / sqrt((va + vb)^2 - 4 cov^2), tested as a Pearson correlation with n - 2 df
    denominator = (va + vb) ** 2 - 4 * r2 * va * vb
    rho = (va - vb) / math.sqrt(denominator) if denominator > 0 else math.copysign(1.0, va - vb)
    p = 0.0 if abs(rho) >= 1 else float(2 * stats.t.sf(abs(rho) * math.sqrt((n - 2) / (1 - rho * rho)), n - 2))
    t = float(stats.t.ppf(0.5 + level / 2, n - 2))
    k = 1 + 2 * t * t * (1 - r2) / (n - 2)
    root = math.sqrt(k * k - 1)
    return p, f * (k - root), f * (k + root)


def brown_forsythe_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p of the Brown-Forsythe test (Levene about the median) of equal spread; NaN when undefined."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return NAN
    deviations = [abs(x - statistics.median(a)) for x in a] + [abs(x - statistics.median(b)) for x in b]
    if max(deviations) == 0:
        return 1.0  # both samples constant: no difference in spread to detect
    def flat(sample: Sequence[float]) -> bool:
        dev = [abs(x - statistics.median(sample)) for x in sample]
        return max(dev) - min(dev) <= 1e-9 * max(max(dev), 1e-12)

    # Deviations from the median all equal within both samples (always so for two values each): the test's
    # denominator is zero up to rounding and its statistic is undefined.
    if flat(a) and flat(b):
        return NAN
    return float(stats.levene(a, b, center="median").pvalue)


def t_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the one-sample t test of mean 0 (1 for all-zero differences, 0 for a constant nonzero)."""
    from scipy import stats

    if len(diffs) < 2:
        return NAN
    if statistics.pstdev(diffs) == 0:
        return 1.0 if diffs[0] == 0 else 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test of a zero median; NaN with no nonzero difference."""
    from scipy import stats

    if not any(diffs):
        return NAN
    return float(stats.wilcoxon(diffs).pvalue)


def spread(diffs: Sequence[float], floor: Sequence[float], paired: bool = False) -> Spread:
    """Compare paired differences with floor differences: spreads, variance ratio, equal-spread and zero-mean tests.
    `paired`: diffs[i] and floor[i] come from the same (E, 1) run (same seed), so the ratio's interval and the
    equal-spread test are Pitman-Morgan's."""
    if paired:
        if len(diffs) != len(floor):
            raise ValueError(f"paired samples of different lengths ({len(diffs)} vs {len(floor)})")
        kept = [(float(x), float(y)) for x, y in zip(diffs, floor) if not (math.isnan(x) or math.isnan(y))]
        a, b = [x for x, _ in kept], [y for _, y in kept]
    else:
        a = [float(x) for x in diffs if not math.isnan(x)]
        b = [float(x) for x in floor if not math.isnan(x)]

    def ms(v: list[float]) -> tuple[float, float]:
        """Mean and sample sd (NaN where undefined)."""
        return (statistics.fmean(v) if v else NAN), (statistics.stdev(v) if len(v) > 1 else NAN)

    (m, s), (fm, fs) = ms(a), ms(b)
    f, lo, hi = variance_ratio(a, b)
    pm_p = NAN
    if paired:
        pm_p, lo, hi = pitman_morgan(a, b)
    return Spread(len(a), len(b), m, s, fm, fs, f, lo, hi, brown_forsythe_p(a, b), t_p(a),
                  wilcoxon_p(a) if len(a) > 1 else NAN, t_p(b), paired, pm_p)


def reading(s: Spread, alpha: float = 0.05, vs_floor_p: float = NAN) -> str:
    """What the spread and mean tests say, first that applies: 'nonzero mean (bias)' (t or Wilcoxon p < alpha;
    with `vs_floor_p`, that paired test against the floor runs instead, and the readings name the floor's mean);
    'smaller' / 'larger spread than the dropout floor' (the variance ratio's interval below / above 1) or 'spread
    unlike the dropout floor' (the equal-spread test's p < alpha only: Pitman-Morgan when paired, else Brown-Forsythe); else 'same spread, zero mean: a dropout re-seed
    (variance, not bias)'. 'not decidable' below two values per sample."""
    if s.n < 2 or s.n_floor < 2:
        return "not decidable"
    # Given, `vs_floor_p` tests the pair's differences against the floor's of the same seeds ((B,N)_i - floor_i):
    # both are measured from the same (E, 1) runs, so a reference with a lucky dropout draw shifts both alike.
    against_floor = not math.isnan(vs_floor_p)
    if against_floor:
        mean_shown = vs_floor_p < alpha
    else:
        mean_shown = s.t_p < alpha or (not math.isnan(s.wilcoxon_p) and s.wilcoxon_p < alpha)
    interval_excludes_1 = (math.isfinite(s.var_ratio_low) and math.isfinite(s.var_ratio_high)
                           and not s.var_ratio_low <= 1 <= s.var_ratio_high)
    spread_shown = s.equal_spread_p < alpha or interval_excludes_1
    if mean_shown:
        return "nonzero mean against the dropout floor's (bias)" if against_floor else "nonzero mean (bias)"
    if spread_shown:
        if s.var_ratio_high < 1:
            return "smaller spread than the dropout floor"
        if s.var_ratio_low > 1:
            return "larger spread than the dropout floor"
        return "spread unlike the dropout floor"
    if against_floor:
        return "the floor's spread and mean: a dropout re-seed (variance, not bias)"
    return "same spread, zero mean: a dropout re-seed (variance, not bias)"


def disagreement(a: Sequence[float], b: Sequence[float], regression: bool) -> float:
    """Fraction of positions where two label lists differ, or the RMS difference of two regression outputs."""
    if len(a) != len(b):
        raise ValueError(f"prediction lists of different lengths ({len(a)} vs {len(b)})")
    if not a:
        return NAN
    if regression:
        return math.sqrt(statistics.fmean((float(x) - float(y)) ** 2 for x, y in zip(a, b)))
    return sum(x != y for x, y in zip(a, b)) / len(a)


def majority_rate(labels: Sequence[Any]) -> float:
    """Accuracy of always predicting the most frequent label."""
    if not labels:
        return NAN
    return Counter(labels).most_common(1)[0][1] / len(labels)


# Metrics whose best constant predictor scores 0 whatever the labels (a constant has no correlation).
ZERO_BASELINE_METRICS = ("pearson", "spearmanr", "matthews_correlation")


def trivial_baseline(metric: str, labels: Sequence[Any] | None) -> float:
    """The best score of a constant predictor: majority-class rate for accuracy, F1 of always predicting class 1
    (2p / (1 + p) with p its share) for f1, 0 for correlations; NaN when it needs labels that are not given or the
    metric has no such baseline here."""
    if metric in ZERO_BASELINE_METRICS:
        return 0.0
    if not labels:
        return NAN
    if metric == "accuracy":
        return majority_rate(labels)
    if metric == "f1":
        p = sum(1 for x in labels if x == 1) / len(labels)
        return 2 * p / (1 + p)
    return NAN


def failed(metric: float, baseline: float) -> bool:
    """A run fails when its final metric is not finite or at or below the trivial baseline (NaN baseline: only
    non-finite metrics fail)."""
    if not math.isfinite(metric):
        return True
    return not math.isnan(baseline) and metric <= baseline
