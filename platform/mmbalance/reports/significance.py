"""Statistics for an equal-budget comparison: does method X beat the tuned baseline, and by how much?

Every method is run on the same seeds, and seed ``i`` gives every method the same data split,
initial data order and synthetic draw. The per-seed scores of two methods are therefore paired
observations, and most seed-to-seed variance (an easy or hard split) is shared between them.
Comparing them through the per-seed difference ``d = method - reference`` removes that shared
variance; an unpaired test would count it twice and miss real differences.

- Intervals are Student-t confidence intervals of the mean: ``mean ± t_{(1+c)/2, n-1} · s/√n``
  with the sample standard deviation ``s`` (ddof=1). With a handful of seeds the normal
  approximation is too narrow, and t is exact for normally distributed seed scores.
- The test is the paired t-test, two-sided, on ``d`` (the same statistic as
  ``scipy.stats.ttest_rel``). Two-sided because a method may also be worse than the baseline.
- Several methods compared against one reference form one family of tests, so their p-values are
  adjusted together (Holm by default, which controls the family-wise error rate like Bonferroni
  but rejects at least as often).

Scores are taken to be higher-is-better (accuracies). With one seed no interval or test exists:
the half-width and p-value are NaN and the verdict says so instead of guessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import special  # t cdf/quantile without importing all of scipy.stats

Correction = Literal["holm", "bonferroni", "none"]
CORRECTIONS: tuple[str, ...] = ("holm", "bonferroni", "none")

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no significant difference"
TOO_FEW_SEEDS = "too few seeds"


@dataclass(frozen=True)
class Interval:
    """A mean with its t confidence interval; ``half_width`` is NaN when n < 2."""

    mean: float
    half_width: float
    n: int
    std: float
    confidence: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


@dataclass(frozen=True)
class PairedComparison:
    """``a - b`` per seed: the mean difference with its t interval and the paired t-test p-value."""

    difference: Interval
    p_value: float

    @property
    def n(self) -> int:
        return self.difference.n


@dataclass(frozen=True)
class Row:
    """One method against the reference, as a report table prints it."""

    method: str
    reference: str
    method_interval: Interval
    reference_interval: Interval
    comparison: PairedComparison
    p_adjusted: float
    verdict: str

    @property
    def p_raw(self) -> float:
        return self.comparison.p_value


def _as_scores(values: Sequence[float], name: str) -> np.ndarray:
    # A NaN score is a failed or missing seed; dropping it silently would break the pairing.
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty list of per-seed scores, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds a non-finite score: {array.tolist()}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of per-seed scores with its Student-t interval (n-1 dof, sample std)."""
    _check_confidence(confidence)
    scores = _as_scores(values, "values")
    n = scores.size
    mean = float(scores.mean())
    if n < 2:
        return Interval(mean=mean, half_width=math.nan, n=n, std=math.nan, confidence=confidence)
    std = float(scores.std(ddof=1))
    quantile = float(special.stdtrit(n - 1, (1.0 + confidence) / 2.0))  # t_{(1+c)/2, n-1}
    return Interval(mean=mean, half_width=quantile * std / math.sqrt(n), n=n, std=std, confidence=confidence)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Paired comparison of ``a - b``; both lists must follow the same seed order."""
    first, second = _as_scores(a, "a"), _as_scores(b, "b")
    if first.size != second.size:
        raise ValueError(
            f"paired scores need one value per seed on both sides: a has {first.size} values, b has {second.size}"
        )
    difference = mean_interval(first - second, confidence)
    return PairedComparison(difference=difference, p_value=_paired_p_value(difference))


def _paired_p_value(difference: Interval) -> float:
    """Two-sided paired t-test p-value from the interval of the differences."""
    if difference.n < 2:
        return math.nan
    if difference.std == 0.0:
        # The t statistic is 0/0 or ±inf: an exactly constant difference is either no
        # difference at all or a difference measured without error.
        return 1.0 if difference.mean == 0.0 else 0.0
    t_stat = difference.mean / (difference.std / math.sqrt(difference.n))
    return float(2.0 * special.stdtr(difference.n - 1, -abs(t_stat)))  # both tails of t_{n-1}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values: step-down, made monotone, capped at 1.

    NaN p-values (comparisons with too few seeds) are not tests, so they stay NaN and do not
    enlarge the family.
    """
    tested = sorted((p, name) for name, p in p_values.items() if not math.isnan(p))
    family = len(tested)
    adjusted = {name: math.nan for name in p_values}
    running = 0.0
    for rank, (p, name) in enumerate(tested):
        # Taking the running maximum keeps a smaller raw p from getting a larger adjusted p.
        running = max(running, min(1.0, (family - rank) * p))
        adjusted[name] = running
    return adjusted


def bonferroni(p_values: dict[str, float]) -> dict[str, float]:
    """Bonferroni adjusted p-values (``m · p`` capped at 1); NaN entries are left out of ``m``."""
    family = sum(not math.isnan(p) for p in p_values.values())
    return {name: p if math.isnan(p) else min(1.0, family * p) for name, p in p_values.items()}


def adjust(p_values: dict[str, float], correction: Correction = "holm") -> dict[str, float]:
    """Adjust a family of p-values with the named correction ("none" returns them unchanged)."""
    if correction == "holm":
        return holm(p_values)
    if correction == "bonferroni":
        return bonferroni(p_values)
    if correction == "none":
        return dict(p_values)
    raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")


def significant(adjusted: dict[str, float], alpha: float = 0.05) -> dict[str, bool]:
    """Which adjusted p-values reject at ``alpha`` (strictly below; NaN never rejects)."""
    return {name: (not math.isnan(p)) and p < alpha for name, p in adjusted.items()}


def verdict(comparison: PairedComparison, p_adjusted: float, alpha: float) -> str:
    """Words for one comparison: a direction only when the test and the interval both agree."""
    if comparison.n < 2:
        return TOO_FEW_SEEDS
    rejected = (not math.isnan(p_adjusted)) and p_adjusted < alpha
    if rejected and comparison.difference.low > 0.0:
        return BETTER
    if rejected and comparison.difference.high < 0.0:
        return WORSE
    return NO_DIFFERENCE


def compare_to_reference(
    per_method: dict[str, Sequence[float]], reference: str, alpha: float = 0.05, correction: Correction = "holm"
) -> list[Row]:
    """Every method except ``reference`` against it, in the order of ``per_method``.

    Intervals use confidence ``1 - alpha``, so an interval that excludes zero agrees with the
    uncorrected test at ``alpha``. The correction spans the methods compared here.
    """
    if reference not in per_method:
        raise ValueError(f"reference {reference!r} is not among the methods: {', '.join(per_method)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    confidence = 1.0 - alpha
    baseline = per_method[reference]
    comparisons: dict[str, PairedComparison] = {}
    for method, scores in per_method.items():
        if method == reference:
            continue
        try:
            comparisons[method] = paired_difference(scores, baseline, confidence)
        except ValueError as error:
            raise ValueError(f"{method!r} against reference {reference!r}: {error}") from error
    adjusted = adjust({m: c.p_value for m, c in comparisons.items()}, correction)
    reference_interval = mean_interval(baseline, confidence)
    return [
        Row(
            method=method,
            reference=reference,
            method_interval=mean_interval(per_method[method], confidence),
            reference_interval=reference_interval,
            comparison=comparison,
            p_adjusted=adjusted[method],
            verdict=verdict(comparison, adjusted[method], alpha),
        )
        for method, comparison in comparisons.items()
    ]


def format_interval(interval: Interval, digits: int = 3) -> str:
    """Report text such as "0.812 ± 0.014"; an undefined half-width prints as "–" (as tables do)."""
    width = "–" if math.isnan(interval.half_width) else f"{interval.half_width:.{digits}f}"
    return f"{interval.mean:.{digits}f} ± {width}"
