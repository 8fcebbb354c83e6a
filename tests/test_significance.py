"""Comparison statistics: t intervals, paired t-tests, Holm/Bonferroni and verdicts, checked on
hand-computed numbers, against scipy's own implementations, and on constructed seed tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mmbalance.reports.significance import (
    Interval,
    adjust,
    bonferroni,
    compare_to_reference,
    format_interval,
    holm,
    mean_interval,
    paired_difference,
    significant,
)

T_975_DF3 = 3.182446  # t_{0.975, 3}, from a printed t table
T_975_DF4 = 2.776445  # t_{0.975, 4}

# Accuracy in points over 5 seeds; seed i is the same split and data order for every method.
REFERENCE = [70.0, 72.0, 71.0, 69.0, 73.0]


def shifted(deltas: list[float]) -> list[float]:
    return [r + d for r, d in zip(REFERENCE, deltas)]


def verdicts(rows) -> dict[str, str]:
    return {row.method: row.verdict for row in rows}


# -- intervals -------------------------------------------------------------------------------


def test_mean_interval_matches_hand_values():
    # mean 3; squared deviations 4+1+0+1+4 = 10, s^2 = 10/4 = 2.5;
    # half width = 2.776445 * sqrt(2.5) / sqrt(5) = 2.776445 * 0.707107 = 1.963243
    interval = mean_interval([1, 2, 3, 4, 5])
    assert interval.n == 5
    assert interval.mean == pytest.approx(3.0, abs=1e-12)
    assert interval.std == pytest.approx(math.sqrt(2.5), abs=1e-12)
    assert interval.half_width == pytest.approx(T_975_DF4 * math.sqrt(2.5) / math.sqrt(5), abs=1e-4)
    assert interval.half_width == pytest.approx(1.963243, abs=1e-4)
    assert (interval.low, interval.high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-4)


@pytest.mark.parametrize("n, confidence", [(2, 0.95), (3, 0.9), (5, 0.95), (10, 0.99)])
def test_mean_interval_matches_scipy_t_interval(n, confidence):
    values = np.random.default_rng(n).normal(0.8, 0.03, size=n)
    interval = mean_interval(values, confidence)
    low, high = stats.t.interval(confidence, n - 1, loc=values.mean(), scale=stats.sem(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-10)


def test_single_seed_interval_is_undefined_not_an_error():
    interval = mean_interval([0.81])
    assert interval.n == 1 and interval.mean == 0.81
    assert math.isnan(interval.half_width) and math.isnan(interval.std)


def test_equal_values_have_zero_half_width():
    interval = mean_interval([0.5, 0.5, 0.5])
    assert interval.half_width == 0.0 and interval.std == 0.0


def test_non_finite_or_empty_scores_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([0.8, float("nan"), 0.7])
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])


# -- paired differences ----------------------------------------------------------------------


def test_paired_difference_matches_hand_values():
    # d = a - b = [2, 3, 1, 3]; mean 2.25; squared deviations 0.0625 + 0.5625 + 1.5625 + 0.5625
    # = 2.75, s^2 = 2.75/3 = 0.916667, s = 0.957427, se = s/2 = 0.478714;
    # t = 2.25/0.478714 = 4.700097; half width = 3.182446 * 0.478714 = 1.523475;
    # two-sided p = 2 * P(T_3 > 4.700097) = 0.018220.
    result = paired_difference([5, 7, 6, 9], [3, 4, 5, 6])
    assert result.n == 4
    assert result.difference.mean == pytest.approx(2.25, abs=1e-12)
    assert result.difference.std == pytest.approx(0.957427, abs=1e-5)
    assert result.difference.half_width == pytest.approx(T_975_DF3 * 0.478714, abs=1e-4)
    assert result.difference.half_width == pytest.approx(1.523475, abs=1e-4)
    assert result.p_value == pytest.approx(0.018220, abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_paired_p_value_and_interval_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n = 3 + seed
    b = rng.normal(0.75, 0.02, size=n)
    a = b + rng.normal(0.01 * seed, 0.01, size=n)
    result = paired_difference(a, b)
    assert result.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    d = a - b
    low, high = stats.t.interval(0.95, n - 1, loc=d.mean(), scale=stats.sem(d))
    assert (result.difference.low, result.difference.high) == pytest.approx((low, high), rel=1e-9)


def test_constant_nonzero_difference_is_exact():
    result = paired_difference([3.0, 5.0, 4.0], [1.0, 3.0, 2.0])
    assert result.difference.mean == 2.0 and result.difference.half_width == 0.0
    assert result.p_value == 0.0


def test_identical_scores_give_p_one():
    result = paired_difference(REFERENCE, REFERENCE)
    assert result.difference.mean == 0.0 and result.p_value == 1.0


def test_single_seed_pair_has_no_p_value():
    assert math.isnan(paired_difference([0.8], [0.7]).p_value)


def test_mismatched_lengths_are_refused_with_both_lengths():
    with pytest.raises(ValueError, match=r"a has 5 values, b has 4"):
        paired_difference([1, 2, 3, 4, 5], [1, 2, 3, 4])


# -- multiple comparisons --------------------------------------------------------------------


def test_holm_matches_hand_example():
    # sorted: 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 to stay monotone.
    adjusted = holm({"x": 0.01, "y": 0.04, "z": 0.03})
    assert adjusted == pytest.approx({"x": 0.03, "y": 0.06, "z": 0.06}, abs=1e-12)


def test_holm_is_capped_at_one_and_keeps_order():
    adjusted = holm({"x": 0.5, "y": 0.6, "z": 0.001})
    assert adjusted == pytest.approx({"x": 1.0, "y": 1.0, "z": 0.003}, abs=1e-12)


def test_nan_p_values_stay_out_of_the_family():
    # Only two real tests: 0.02*2 = 0.04 and 0.03*1 -> 0.04 (monotone).
    p = {"x": 0.02, "y": math.nan, "z": 0.03}
    assert holm(p)["x"] == pytest.approx(0.04) and holm(p)["z"] == pytest.approx(0.04)
    assert math.isnan(holm(p)["y"]) and math.isnan(bonferroni(p)["y"])
    assert bonferroni(p)["z"] == pytest.approx(0.06)


def test_bonferroni_multiplies_by_family_size_and_caps():
    assert bonferroni({"x": 0.01, "y": 0.4, "z": 0.03}) == pytest.approx({"x": 0.03, "y": 1.0, "z": 0.09})


def test_significance_is_strictly_below_alpha():
    assert significant({"x": 0.049, "y": 0.05, "z": math.nan}, alpha=0.05) == {"x": True, "y": False, "z": False}


def test_unknown_correction_is_refused():
    with pytest.raises(ValueError, match="holm, bonferroni, none"):
        adjust({"x": 0.1}, "sidak")


# -- verdicts --------------------------------------------------------------------------------


def test_identical_method_shows_no_difference():
    rows = compare_to_reference({"lf": REFERENCE, "copy": list(REFERENCE)}, reference="lf")
    assert [row.method for row in rows] == ["copy"]
    assert rows[0].verdict == "no significant difference"
    assert rows[0].p_raw == 1.0


def test_much_worse_method_is_worse():
    rows = compare_to_reference({"lf": REFERENCE, "bad": shifted([-20.1, -19.8, -20.3, -19.9, -20.0])}, reference="lf")
    row = rows[0]
    assert row.verdict == "worse"
    assert row.comparison.difference.mean == pytest.approx(-20.02, abs=1e-9)
    assert row.comparison.difference.high < 0 and row.p_adjusted < 0.05


def test_small_noisy_gain_shows_no_difference():
    rows = compare_to_reference({"lf": REFERENCE, "noisy": shifted([5.0, -4.0, 3.0, -2.0, 1.0])}, reference="lf")
    row = rows[0]
    assert row.comparison.difference.mean > 0
    assert row.comparison.difference.low < 0 < row.comparison.difference.high
    assert row.verdict == "no significant difference"


def test_consistent_gain_is_better():
    rows = compare_to_reference({"lf": REFERENCE, "good": shifted([2.0, 3.0, 1.0, 2.0, 4.0])}, reference="lf")
    assert rows[0].verdict == "better" and rows[0].comparison.difference.low > 0


def test_single_seed_says_too_few_seeds():
    rows = compare_to_reference({"lf": [71.0], "x": [90.0]}, reference="lf")
    assert rows[0].verdict == "too few seeds"
    assert math.isnan(rows[0].p_raw) and math.isnan(rows[0].p_adjusted)
    assert format_interval(rows[0].method_interval, digits=1) == "90.0 ± –"


def test_correction_turns_a_borderline_gain_into_no_difference():
    methods = {
        "lf": REFERENCE,
        "borderline": shifted([1.0, 3.0, 1.0, 2.0, 4.0]),  # raw p = 0.0196
        "flat": shifted([1.0, -1.0, 2.0, -2.0, 0.0]),
        "noisy": shifted([5.0, -4.0, 3.0, -2.0, 1.0]),
    }
    raw = {row.method: row for row in compare_to_reference(methods, "lf", correction="none")}
    assert 0.05 / 3 < raw["borderline"].p_raw < 0.05  # rejects alone, not once tripled
    assert raw["borderline"].verdict == "better"
    for correction in ("holm", "bonferroni"):
        rows = {row.method: row for row in compare_to_reference(methods, "lf", correction=correction)}
        assert rows["borderline"].p_adjusted == pytest.approx(3 * raw["borderline"].p_raw)
        assert rows["borderline"].p_adjusted > 0.05
        assert rows["borderline"].verdict == "no significant difference"


def test_unknown_reference_and_ragged_seeds_are_refused():
    with pytest.raises(ValueError, match="'mnl' is not among the methods: lf, arm"):
        compare_to_reference({"lf": REFERENCE, "arm": REFERENCE}, reference="mnl")
    with pytest.raises(ValueError, match="'arm' against reference 'lf'.*a has 4 values, b has 5"):
        compare_to_reference({"lf": REFERENCE, "arm": REFERENCE[:4]}, reference="lf")


def test_intervals_use_one_minus_alpha():
    rows = compare_to_reference({"lf": REFERENCE, "x": shifted([1.0, 2.0, 0.0, 1.0, 3.0])}, "lf", alpha=0.1)
    assert rows[0].reference_interval.confidence == pytest.approx(0.9)
    assert rows[0].reference_interval == mean_interval(REFERENCE, 0.9)


# -- report text -----------------------------------------------------------------------------


def test_format_interval_rounds_mean_and_half_width():
    assert (
        format_interval(Interval(mean=0.8123, half_width=0.01391, n=5, std=0.011, confidence=0.95)) == "0.812 ± 0.014"
    )
