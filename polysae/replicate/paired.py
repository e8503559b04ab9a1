"""Paired comparisons over seeds: is model B better than model A, by how much, how sure are we?

With one value per seed for each model, trained on the same data order and evaluated on the same
texts, the per-seed differences ``d_s = b_s - a_s`` remove what the two share (data order, probe
splits, held-out tokens), so the paired interval is much tighter than comparing two means.

- **t interval** (the primary one): ``mean(d) ± t_{(1+c)/2, n-1} · sd(d) / sqrt(n)``, exact under
  normal differences. With 3 seeds, t_{0.975, 2} = 4.30, so only large, consistent effects exclude 0
  — which is the honest answer at that many seeds.
- **percentile bootstrap** of ``mean(d)``: no normality assumption, but with n seeds there are only
  ``C(2n-1, n)`` distinct resamples (10 at n = 3), so it is too narrow for small n; it is reported
  next to the t interval, not instead of it.
- ``wins``: seeds with ``d_s > 0`` (a sign count); ``p_t``: two-sided paired t-test p-value.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


class Summary(NamedTuple):
    """Mean and sample standard deviation (ddof 1) of one model's values over seeds."""

    n: int
    """Number of values (seeds) that are finite."""
    mean: float
    """Mean."""
    std: float
    """Sample standard deviation (NaN for n < 2)."""


class PairedDiff(NamedTuple):
    """The paired difference ``b - a`` over seeds with its intervals."""

    n: int
    """Seeds with a finite value for both models."""
    a: Summary
    """Model A (the baseline, e.g. vanilla)."""
    b: Summary
    """Model B (e.g. PolySAE)."""
    mean: float
    """Mean of the per-seed differences ``b_s - a_s``."""
    std: float
    """Sample standard deviation of the differences."""
    t_low: float
    """Lower end of the t confidence interval of the mean difference."""
    t_high: float
    """Upper end of the t interval."""
    boot_low: float
    """Lower end of the percentile-bootstrap interval (too narrow for few seeds; see module)."""
    boot_high: float
    """Upper end of the bootstrap interval."""
    p_t: float
    """Two-sided paired t-test p-value (NaN if the differences have no spread)."""
    wins: int
    """Seeds where ``b_s > a_s``."""
    confidence: float
    """Confidence level of both intervals."""

    @property
    def excludes_zero(self) -> bool:
        """Whether the t interval lies entirely on one side of 0."""
        return bool(self.t_low > 0 or self.t_high < 0)

    def to_dict(self) -> dict:
        d = self._asdict()
        d["a"], d["b"] = self.a._asdict(), self.b._asdict()
        d["excludes_zero"] = self.excludes_zero
        return d


def summarize(x: Sequence[float]) -> Summary:
    v = np.asarray([float(t) for t in x if t is not None and math.isfinite(float(t))])
    if v.size == 0:
        return Summary(0, math.nan, math.nan)
    return Summary(int(v.size), float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan)


def t_interval(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``d``."""
    from scipy.stats import t

    n = d.size
    if n < 2:
        return math.nan, math.nan
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    m = float(d.mean())
    return m - half, m + half


def bootstrap_interval(d: np.ndarray, confidence: float = 0.95, n_boot: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``d`` (resampling with replacement)."""
    n = d.size
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def paired_diff(a: Sequence[float | None], b: Sequence[float | None], *,
                confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> PairedDiff:
    """Paired difference ``b - a``; ``a[s]`` and ``b[s]`` come from the same seed ``s``. Seeds
    where either value is missing or not finite are dropped from the difference."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff: {len(a)} values for A but {len(b)} for B; pairs need one "
                         f"value per seed for each")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_diff: confidence must be in (0, 1), got {confidence}")
    ok = [(float(x), float(y)) for x, y in zip(a, b) if x is not None and y is not None
          and math.isfinite(float(x)) and math.isfinite(float(y))]
    d = np.asarray([y - x for x, y in ok], dtype=np.float64)
    t_lo, t_hi = t_interval(d, confidence)
    b_lo, b_hi = bootstrap_interval(d, confidence, n_boot, seed)
    p = math.nan
    if d.size >= 2 and d.std(ddof=1) > 0:
        from scipy.stats import t

        tstat = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
        p = float(2 * t.sf(abs(tstat), d.size - 1))
    return PairedDiff(int(d.size), summarize(a), summarize(b),
                      float(d.mean()) if d.size else math.nan,
                      float(d.std(ddof=1)) if d.size > 1 else math.nan, t_lo, t_hi, b_lo, b_hi, p,
                      int((d > 0).sum()), confidence)


__all__ = ["PairedDiff", "Summary", "bootstrap_interval", "paired_diff", "summarize",
           "t_interval"]
