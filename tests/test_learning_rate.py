"""learning_rate end to end on a reduced config: divergence as data, figure, claims from the raw records."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from analysis.load import load_runs
from studies import learning_rate as study
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep

LRS = (0.01, 0.1, 1000.0)
TINY = replace(
    study.QUICK,
    dataset="gaussian",
    n_train=256,
    n_test=200,
    norms=("none", "bn"),
    lrs=LRS,
    seeds=2,
    steps=30,
    depth=3,
    width=32,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "learning_rate", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 2 * 3 * 2  # norms x lrs x seeds: diverging runs finish too
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "learning_rate", config_columns=study.STUDY.config_columns)


@pytest.fixture(scope="module")
def claims(results):
    return json.loads((results.figures_dir / "claims.json").read_text())


def _outcome(df, norm, lr, seed):
    """(diverged, final test accuracy) of one run, straight from the rows."""
    run = df[(df["norm"] == norm) & (df["lr"] == lr) & (df["seed"] == seed)]
    diverged = bool(((run["probe"] == "train") & (run["metric"] == "diverged")).any())
    acc = run[(run["probe"] == "eval") & (run["metric"] == "test_accuracy")].sort_values("step")
    return diverged, acc["value"].iloc[-1]


def test_records_have_the_promised_fields(df):
    assert set(df["norm"]) == {"none", "bn"} and set(df["seed"]) == {0, 1} and set(df["lr"]) == set(LRS)
    # the unnormalized net at lr 1000 diverges: recorded as data, with no evaluation after it
    for seed in (0, 1):
        run = df[(df["norm"] == "none") & (df["lr"] == 1000.0) & (df["seed"] == seed)]
        diverged = run[run["metric"] == "diverged"]
        assert len(diverged) == 1 and diverged["value"].iloc[0] == 1.0
        assert set(run.loc[run["probe"] == "eval", "step"]) == {0}
    for seed in (0, 1):  # small rates train the full 30 updates
        run = df[(df["norm"] == "none") & (df["lr"] == 0.01) & (df["seed"] == seed) & (df["probe"] == "eval")]
        assert set(run["step"]) == {0, 30}


def test_landscape_at_initialization(df):
    land = df[df["probe"] == "landscape"]
    assert set(land["lr"]) == {min(LRS)} and set(land["step"]) == {0}  # once per (norm, seed)
    rel = land[land["metric"] == "relative_loss"]
    assert len(rel) == 2 * 2 * len(LRS) and set(rel["eta"]) == set(LRS)
    for (_, _), part in land.groupby(["norm", "seed"]):
        loss0 = part.loc[part["metric"] == "loss_at_w", "value"].iloc[0]
        losses = part[part["metric"] == "loss"].set_index("eta")["value"]
        ratios = part[part["metric"] == "relative_loss"].set_index("eta")["value"]
        np.testing.assert_allclose(ratios, losses / loss0, rtol=1e-12)
        assert np.log(10) * 0.9 < loss0 < np.log(10) * 1.5  # cross-entropy near log(classes) at init


def test_figure_and_claims(results, claims):
    for suffix in ("pdf", "png"):
        assert (results.figures_dir / f"learning_rate.{suffix}").stat().st_size > 1000
    assert len(claims) == 3
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]
    assert claims[0]["criterion"] == "95% CI lower bound >= 1"
    assert claims[0]["holds"] == (claims[0]["n"] > 0 and claims[0]["ci_low"] >= 1)


def test_claims_are_computed_from_records(df, claims):
    """Largest trainable rate and blow-up step size recomputed by brute force from the raw rows."""
    ratios, blowups = [], []
    for seed in (0, 1):
        best = {}
        for norm in ("none", "bn"):
            trains = []
            for lr in LRS:
                diverged, acc = _outcome(df, norm, lr, seed)
                if not diverged and acc >= 0.2:
                    trains.append(lr)
            best[norm] = max(trains) if trains else np.nan
        ratios.append(np.log10(best["bn"] / best["none"]))
        eta_star = {}
        for norm in ("none", "bn"):
            rel = df[
                (df["norm"] == norm)
                & (df["seed"] == seed)
                & (df["probe"] == "landscape")
                & (df["metric"] == "relative_loss")
            ].sort_values("eta")
            blown = [eta for eta, v in zip(rel["eta"], rel["value"], strict=True) if not v < 2.0]
            eta_star[norm] = blown[0] if blown else LRS[-1] ** 2 / LRS[-2]
        blowups.append(np.log10(eta_star["bn"] / eta_star["none"]))
    finite = [r for r in ratios if np.isfinite(r)]
    assert claims[0]["n"] == claims[1]["n"] == len(finite)
    if finite:
        assert claims[1]["estimate"] == pytest.approx(np.mean(finite), rel=1e-12)
    assert claims[2]["n"] == 2 and claims[2]["estimate"] == pytest.approx(np.mean(blowups), rel=1e-12)
