"""placement end to end on a reduced config: records, figures, claims recomputed from the raw records."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from analysis.load import load_runs
from studies import placement as study
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep
from tests.records import diverged_at

TINY = replace(
    study.QUICK,
    activations=("relu", "sigmoid"),
    seeds=2,
    steps=40,
    log_every=10,
    eval_every=20,
    probe_every=20,
    probe_size=100,
    landscape_steps=(0, 40),
)
STEPS = [0, 20, 40]
LAYERS = ["blocks.0.act", "blocks.1.act", "blocks.2.act"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "placement", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 2 * 3 * 2  # activations x variants x seeds
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "placement", config_columns=study.STUDY.config_columns)


@pytest.fixture(scope="module")
def claims(results):
    return json.loads((results.figures_dir / "claims.json").read_text())


def test_records_have_the_promised_fields(df):
    assert set(df["variant"]) == {"none", "bn_before", "bn_after"} and set(df["norm"]) == {"none", "bn"}
    assert set(df[df["variant"] == "bn_after"]["placement"]) == {"after"}
    assert set(df["activation"]) == {"relu", "sigmoid"} and set(df["seed"]) == {0, 1}
    assert set(df["arch"]) == {"mlp"} and set(df["lr"]) == {0.1} and set(df["dataset"]) == {"mnist1d"}
    sat = df[df["probe"] == "saturation"]
    assert sorted(sat["step"].unique()) == STEPS and set(sat["layer"]) == {*LAYERS, "all"}
    assert len(sat) == 12 * len(STEPS) * 4 * 3  # runs x steps x (3 layers + all) x metrics
    fractions = sat[sat["metric"].isin(["saturated_fraction", "dead_fraction"])]["value"]
    assert fractions.between(0, 1).all()
    land = df[df["probe"] == "landscape"]
    assert sorted(land["step"].unique()) == [0, 40] and set(land["metric"]) == set(study.LANDSCAPE_SUMMARIES)
    assert np.isfinite(land["value"]).all() and (land[land["metric"] == "beta_eff"]["value"] > 0).all()
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    assert acc["value"].between(0, 1).all() and len(acc) == 12 * len(STEPS)


def test_saturation_summaries(df):
    """Layer "all" is the mean over the layers; dead ≤ saturated; BN before a sigmoid at init: its
    input is the standardized pre-activation, so |z| > 3.64 is rare (0.03% for a standard normal)."""
    sat = df[df["probe"] == "saturation"]
    wide = sat.pivot_table(index=["run_id", "step", "layer"], columns="metric", values="value")
    layers = wide.drop(index="all", level="layer").groupby(level=["run_id", "step"]).mean()
    overall = wide.xs("all", level="layer")
    assert np.allclose(layers.to_numpy(), overall.loc[layers.index].to_numpy(), rtol=1e-12)
    assert (wide["dead_fraction"] <= wide["saturated_fraction"]).all()
    init = sat[(sat["activation"] == "sigmoid") & (sat["variant"] == "bn_before") & (sat["step"] == 0)]
    assert (init[init["metric"] == "saturated_fraction"]["value"] < 0.005).all()
    relu = sat[(sat["activation"] == "relu") & (sat["metric"] == "saturated_fraction") & (sat["step"] == 0)]
    assert relu["value"].between(0.3, 0.7).all()  # about half the ReLU inputs are negative at init


def test_relative_derivative():
    z = torch.tensor([-5.0, -1.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    assert study.relative_derivative("sigmoid", z)[2] == 1 and study.relative_derivative("tanh", z)[2] == 1
    assert study.relative_derivative("relu", z).tolist() == [0, 0, 0, 1, 1]
    saturated = (study.relative_derivative("sigmoid", z) < study.SATURATION_LEVEL).tolist()
    assert saturated == [True, False, False, False, True]  # threshold |z| > 3.64
    with pytest.raises(ValueError, match="no saturation rule"):
        study.relative_derivative("gelu", z)


def test_figures_and_claims(results, claims):
    for name in study.STUDY.figures:
        assert (results.figures_dir / f"{name}.pdf").stat().st_size > 1000
        assert (results.figures_dir / f"{name}.png").stat().st_size > 1000
    assert len(claims) == 2 + 1  # claim 1 per activation, claim 2 for the sigmoid
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["n"] == 2 and claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]
    assert claims[0]["criterion"] == "95% CI lower bound > -0.01"


def test_claims_are_computed_from_records(df, claims):
    """Both claims' estimates by brute force from the raw rows."""
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy") & (df["step"] == 40)]
    sat = df[(df["probe"] == "saturation") & (df["metric"] == "saturated_fraction") & (df["step"] > 0)]

    def value(rows, activation, variant, seed):
        run = rows[(rows["activation"] == activation) & (rows["variant"] == variant) & (rows["seed"] == seed)]
        return run["value"].item()

    def saturation(activation, variant, seed):
        run = sat[(sat["activation"] == activation) & (sat["variant"] == variant) & (sat["seed"] == seed)]
        per_step = [np.mean(run[(run["step"] == t) & (run["layer"] != "all")]["value"]) for t in (20, 40)]
        return np.mean(per_step)

    for i, activation in enumerate(("relu", "sigmoid")):
        diff = [
            value(acc, activation, "bn_before", s) - value(acc, activation, "bn_after", s) for s in (0, 1)
        ]
        assert claims[i]["estimate"] == pytest.approx(np.mean(diff), abs=1e-12)
        assert activation in claims[i]["claim"]
    diff = [saturation("sigmoid", "bn_after", s) - saturation("sigmoid", "bn_before", s) for s in (0, 1)]
    assert (
        claims[2]["estimate"] == pytest.approx(np.mean(diff), abs=1e-12) and "sigmoid" in claims[2]["claim"]
    )


def test_a_diverged_run_leaves_its_pair_and_a_case_without_pairs_says_n_0(df):
    """A diverged run's last evaluation is from before it blew up (often its untrained net): the claims
    scored it as final (BN before was "worse" than a net that diverged at step 70, in a real sweep at
    lr 2), and a case whose runs all diverged lost its claim row. Now the pair leaves and n says so."""
    runs = df.drop_duplicates("run_id").set_index(["activation", "variant", "seed"])["run_id"]
    cut = diverged_at(df, runs["relu", "bn_after", 0], 40)  # its last evaluation: step 20
    cut = diverged_at(cut, runs["sigmoid", "bn_after", 0], 20)
    cut = diverged_at(cut, runs["sigmoid", "bn_after", 1], 20)
    claims = study.claims(cut)
    assert [(c.n, c.holds) for c in claims[1:]] == [(0, False), (0, False)]  # sigmoid: accuracy, saturation
    assert "relu" in claims[0].claim and claims[0].n == 1
    acc = cut[(cut["probe"] == "eval") & (cut["metric"] == "test_accuracy") & (cut["activation"] == "relu")]
    seed1 = acc[(acc["seed"] == 1) & (acc["step"] == 40)].set_index("variant")["value"]
    assert claims[0].estimate == pytest.approx(seed1["bn_before"] - seed1["bn_after"], abs=1e-12)
