"""Ratio metrics randomised by member: the delta method (Deng, Knoblich and Lu, "Applying the
Delta Method in Metric Analytics", KDD 2018).

Members are the unit of randomisation, but the acceptance rate is per exposed edge: a ratio
of two member-level sums, R = sum(y) / sum(x). A member's edges are not independent trials
(some members accept far more than others), so a binomial variance over edges is too small.
The delta method keeps the member as the unit:

    Var(R) ~= (s_yy - 2 R s_xy + R^2 s_xx) / (n * mean(x)^2)

with s_* the sample (co)variances of the member-level sums. The relative lift of a treatment
over control is L = R_t / R_c - 1; the arms are independent, and the delta method on the
ratio of the two means gives

    Var(L) ~= Var(R_t) / R_c^2 + R_t^2 Var(R_c) / R_c^4

and the 95% interval L +- 1.96 sqrt(Var(L)) (a normal interval on the relative change, not
Fieller's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Ratio:
    """sum(num) / sum(den) over the members of one arm, with its delta-method variance."""

    value: float
    variance: float  # NaN when under two members
    members: int


def ratio(num: np.ndarray, den: np.ndarray) -> Ratio:
    """num[i], den[i]: member i's outcome count and exposure count."""
    n = len(den)
    den_sum = float(np.sum(den))
    if n == 0 or den_sum <= 0:
        return Ratio(math.nan, math.nan, n)
    value = float(np.sum(num)) / den_sum
    if n < 2:
        return Ratio(value, math.nan, n)
    x = np.asarray(den, dtype=np.float64)
    y = np.asarray(num, dtype=np.float64)
    cov = np.cov(np.vstack([y, x]), ddof=1)
    s_yy, s_xy, s_xx = float(cov[0, 0]), float(cov[0, 1]), float(cov[1, 1])
    mean_x = den_sum / n
    variance = (s_yy - 2 * value * s_xy + value * value * s_xx) / (n * mean_x * mean_x)
    return Ratio(value, max(variance, 0.0), n)


@dataclass(frozen=True)
class Lift:
    value: float  # relative: 0.2 is +20%
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (false when it is undefined)."""
        return self.low > 0 or self.high < 0


def relative_lift(treatment: Ratio, control: Ratio, z: float = Z95) -> Lift:
    """R_t / R_c - 1 with its delta-method interval; NaN where control's rate is 0 or unknown."""
    rt, rc = treatment.value, control.value
    if not (math.isfinite(rt) and math.isfinite(rc)) or rc <= 0:
        return Lift(math.nan, math.nan, math.nan)
    value = rt / rc - 1
    var = treatment.variance / rc**2 + rt**2 * control.variance / rc**4
    if not math.isfinite(var):
        return Lift(value, math.nan, math.nan)
    half = z * math.sqrt(var)
    return Lift(value, value - half, value + half)
