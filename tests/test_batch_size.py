"""batch_size end to end on a reduced config: records, figure, claims recomputed from the raw records."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from analysis.load import load_runs
from studies import batch_size as study
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep

N_TRAIN = 64
TINY = replace(
    study.QUICK,
    dataset="gaussian",
    n_train=N_TRAIN,
    n_test=100,
    batch_sizes=(2, 8, 32),
    seeds=2,
    epochs=2,
    depth=2,
    width=16,
    groups=4,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "batch_size", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 3 * 3 * 2  # norms x batch sizes x seeds
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "batch_size", config_columns=study.STUDY.config_columns)


@pytest.fixture(scope="module")
def claims(results):
    return json.loads((results.figures_dir / "claims.json").read_text())


def _error(df, norm, batch, seed):
    """1 − test accuracy at the run's last evaluation, straight from the rows."""
    acc = df[
        (df["norm"] == norm)
        & (df["batch_size"] == batch)
        & (df["seed"] == seed)
        & (df["probe"] == "eval")
        & (df["metric"] == "test_accuracy")
    ]
    return 1.0 - acc.sort_values("step")["value"].iloc[-1]


def test_records_have_the_promised_fields(df):
    assert set(df["norm"]) == {"bn", "gn", "ln"} and set(df["seed"]) == {0, 1}
    assert set(df["batch_size"]) == {2, 8, 32} and set(df["dataset"]) == {"gaussian"}
    for batch in (2, 8, 32):  # linear scaling: lr = 0.1 * B / 32
        np.testing.assert_allclose(df.loc[df["batch_size"] == batch, "lr"], 0.1 * batch / 32, rtol=1e-12)
    assert not (df["metric"] == "diverged").any()
    for (batch, _), run in df.groupby(["batch_size", "run_id"]):
        per_epoch = N_TRAIN // batch  # same samples seen: 2 epochs of updates at every batch size
        evals = run[(run["probe"] == "eval") & (run["metric"] == "test_accuracy")]
        assert sorted(evals["step"]) == [0, per_epoch, 2 * per_epoch]
        assert evals["value"].between(0, 1).all()
        lrs = run[(run["probe"] == "train") & (run["metric"] == "lr")].sort_values("step")["value"]
        assert lrs.iloc[0] == pytest.approx(0.1 * batch / 32) and lrs.is_monotonic_decreasing  # cosine


def test_figure_and_claims(results, claims):
    for suffix in ("pdf", "png"):
        assert (results.figures_dir / f"batch_size.{suffix}").stat().st_size > 1000
    assert len(claims) == 5
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["n"] == 2 and claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]
        assert isinstance(claim["holds"], bool)
    assert claims[0]["criterion"] == "95% CI inside (-0.01, 0.01)"


def test_claims_are_computed_from_records(df, claims):
    """Every estimate equals a brute-force recomputation from the raw eval rows."""
    x = np.log2([2.0, 8.0, 32.0])
    for claim, norm in zip(claims[:2], ("gn", "ln"), strict=True):
        slopes = []
        for seed in (0, 1):
            y = np.array([_error(df, norm, b, seed) for b in (2, 8, 32)])
            slopes.append(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        assert claim["estimate"] == pytest.approx(np.mean(slopes), rel=1e-9, abs=1e-12)
        inside = -0.01 < claim["ci_low"] and claim["ci_high"] < 0.01
        assert claim["holds"] == inside
    expected = [
        np.mean([_error(df, "bn", 2, s) - _error(df, "bn", 32, s) for s in (0, 1)]),
        np.mean([_error(df, "bn", 2, s) - _error(df, "gn", 2, s) for s in (0, 1)]),
        np.mean([_error(df, "gn", 32, s) - _error(df, "bn", 32, s) for s in (0, 1)]),
    ]
    for claim, value in zip(claims[2:], expected, strict=True):
        assert claim["estimate"] == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert claim["holds"] == (claim["ci_low"] > 0)


def test_runs_are_deterministic(results, tmp_path):
    store = RunStore(tmp_path, "batch_size", "quick")
    run_sweep(study.STUDY, replace(TINY, seeds=1, norms=("bn",), batch_sizes=(8,)), store, log=lambda s: None)
    (run_id,) = store.run_ids()
    assert store.load(run_id)[1] == results.load(run_id)[1]
