"""Statistics over seeds: bootstrap confidence intervals and summaries with n."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["DEFAULT_CONFIDENCE", "DEFAULT_RESAMPLES", "Estimate", "bootstrap_ci", "summarize"]

#: The confidence level and bootstrap resamples of every interval whybn reports (the paper quotes them).
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 9999


@dataclass(frozen=True)
class Estimate:
    """A statistic over n independent values (seeds) with its 95% bootstrap confidence interval."""

    estimate: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """``statistic(values)`` with a BCa bootstrap CI (``scipy.stats.bootstrap``), over finite values.

    With one value the interval is the point itself; with identical values it is degenerate. The
    percentile method is used where BCa is undefined (too few distinct values).
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    point = float(statistic(x))
    if x.size == 1 or np.all(x == x[0]):
        return Estimate(point, point, point, int(x.size))

    def stat(sample: np.ndarray, axis: int = -1) -> np.ndarray:
        try:  # numpy reductions take `axis` and are vectorized
            return statistic(sample, axis=axis)
        except TypeError:
            return np.apply_along_axis(statistic, axis, sample)

    kwargs = dict(confidence_level=confidence, n_resamples=n_resamples, rng=np.random.default_rng(seed))
    with np.errstate(all="ignore"):
        try:
            res = stats.bootstrap((x,), stat, method="BCa", vectorized=True, **kwargs)
            low, high = res.confidence_interval
            if not (np.isfinite(low) and np.isfinite(high)):
                raise ValueError("BCa interval undefined")
        except ValueError:
            res = stats.bootstrap((x,), stat, method="percentile", vectorized=True, **kwargs)
            low, high = res.confidence_interval
    return Estimate(point, float(low), float(high), int(x.size))


def summarize(
    df: pd.DataFrame,
    by: Sequence[str],
    value: str = "value",
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> pd.DataFrame:
    """One row per group of ``by``: estimate, 95% CI and n of ``statistic`` over the group's values."""
    rows = []
    for key, group in df.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        est = bootstrap_ci(group[value].to_numpy(), statistic)
        rows.append({**dict(zip(by, key, strict=True)), **est.to_dict()})
    return pd.DataFrame(rows, columns=[*by, "estimate", "ci_low", "ci_high", "n"])
