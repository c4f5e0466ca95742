"""Claims from the literature, tested on records: statistic, estimate over seeds, 95% CI, verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from analysis.stats import bootstrap_ci
from studies.lab.store import write_json

__all__ = ["Claim", "test_claim", "write_claims"]


@dataclass(frozen=True)
class Claim:
    """One literature claim and what our records say about it (a row of claims.json)."""

    claim: str
    source: str
    statistic: str
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    holds: bool
    criterion: str

    def to_dict(self) -> dict:
        return asdict(self)


def test_claim(
    claim: str,
    source: str,
    statistic: str,
    values: Sequence[float] | np.ndarray,
    *,
    threshold: float = 0.0,
    direction: str = ">",
) -> Claim:
    """Decide a claim from per-seed values of a statistic: holds when the whole 95% CI is past ``threshold``.

    ``direction=">"``: the CI's lower end is above the threshold; ``"<"``: its upper end is below it;
    ``">="``: not significantly worse, the CI's upper end is at or above the threshold (this holds
    whenever the data are uninformative; a non-inferiority test with margin m is ``">"`` against −m).
    A claim decided on fewer than 2 values does not hold: one value has no interval (it is printed as
    the point, and a zero-width "95% CI" covers the true mean with probability 0).
    """
    est = bootstrap_ci(values)
    if direction == ">":
        holds, rule = est.ci_low > threshold, f"95% CI lower bound > {threshold:g}"
    elif direction == "<":
        holds, rule = est.ci_high < threshold, f"95% CI upper bound < {threshold:g}"
    elif direction == ">=":
        holds, rule = est.ci_high >= threshold, f"95% CI upper bound >= {threshold:g}"
    else:
        raise ValueError(f"direction must be '>', '<' or '>=', got {direction!r}")
    holds = bool(holds) and est.n >= 2
    return Claim(claim, source, statistic, est.estimate, est.ci_low, est.ci_high, est.n, holds, rule)


# pytest must not collect this as a test when imported into a test module
test_claim.__test__ = False  # type: ignore[attr-defined]


def write_claims(path: Path, claims: Sequence[Claim]) -> None:
    write_json(Path(path), [c.to_dict() for c in claims])
