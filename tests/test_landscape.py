"""landscape end to end on a reduced config: records, figures, claims recomputed from the raw records."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from analysis.load import load_runs
from studies import landscape as study
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep

TINY = replace(study.QUICK, seeds=2, steps=40, probe_every=10, eval_every=20, lp_ps=("1",), match_size=500)
STEPS = [0, 10, 20, 30, 40]
FIGURES = ("landscape", "landscape_lp", "landscape_matched_loss")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "landscape", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 3 * 2 * 2  # variants x lrs x seeds
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "landscape")


@pytest.fixture(scope="module")
def claims(results):
    return json.loads((results.figures_dir / "claims.json").read_text())


def _series(df, variant, lr, seed, probe, metric):
    """{step: value} of one run's rows without a step size."""
    rows = df[
        (df["variant"] == variant)
        & (df["lr"] == lr)
        & (df["seed"] == seed)
        & (df["probe"] == probe)
        & (df["metric"] == metric)
    ]
    return dict(zip(rows["step"], rows["value"], strict=True))


def test_records_have_the_promised_fields(df):
    assert set(df["variant"]) == {"none", "bn", "lp1"} and set(df["norm"]) == {"none", "bn", "lp_bn"}
    assert set(df["lr"]) == {0.05, 0.2} and set(df["seed"]) == {0, 1}
    assert set(df["arch"]) == {"mlp"} and set(df["dataset"]) == {"mnist1d"}
    land = df[df["probe"] == "landscape"]
    assert not (land["metric"] == "failed").any() and np.isfinite(land["value"]).all()
    for metric in ("loss_range", "max_grad_distance", "beta_eff", "loss_at_w", "grad_norm"):
        rows = land[land["metric"] == metric]
        assert len(rows) == 12 * len(STEPS) and sorted(rows["step"].unique()) == STEPS
    per_eta = land[land["metric"] == "beta"]
    assert len(per_eta) == 12 * len(STEPS) * len(TINY.step_multipliers)
    for lr in TINY.lrs:  # η = lr × multiplier
        etas = sorted(per_eta[per_eta["lr"] == lr]["eta"].unique())
        assert etas == pytest.approx([lr * m for m in TINY.step_multipliers], rel=1e-12)
    subset = df[(df["probe"] == "train_subset") & (df["metric"] == "loss")]
    assert len(subset) == 12 * len(STEPS) and (subset["value"] > 0).all()
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    assert acc["value"].between(0, 1).all() and 40 in set(acc["step"])


def test_summaries_agree_with_the_per_step_size_rows(df):
    """loss_range = max − min of L over {w} ∪ {w − ηg}; beta_eff = max_η β; max_grad_distance = max_η d."""
    land = df[df["probe"] == "landscape"]
    for _, point in land.groupby(["run_id", "step"]):
        value = dict(zip(point["metric"], point["value"], strict=False))  # summaries: one row each
        per_eta = point[point["eta"].notna()]
        losses = [*per_eta[per_eta["metric"] == "loss"]["value"], value["loss_at_w"]]
        assert value["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-12)
        assert value["beta_eff"] == pytest.approx(per_eta[per_eta["metric"] == "beta"]["value"].max())
        assert value["max_grad_distance"] == pytest.approx(
            per_eta[per_eta["metric"] == "grad_distance"]["value"].max()
        )


def test_figures_and_claims(results, claims):
    for name in FIGURES:
        for suffix in ("pdf", "png"):
            assert (results.figures_dir / f"{name}.{suffix}").stat().st_size > 1000
    # 3 metrics x 2 lrs at matched step, then early vs late; l1 BN x 2 lrs; 3 metrics x 2 lrs matched loss
    assert len(claims) == 3 * 2 * 2 + 2 + 3 * 2
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]
    assert [c["n"] for c in claims[:14]] == [2] * 14
    assert "lr 0.05" in claims[4]["claim"] and "β-smoothness" in claims[4]["claim"]


def test_matched_step_claims_are_computed_from_records(df, claims):
    """β_eff (claim 3) and ℓ1 BN (claim 5) at lr 0.05, and early − late for the loss range at lr 0.2."""

    def log_ratio(metric, other, lr, seed):
        none = _series(df, "none", lr, seed, "landscape", metric)
        with_norm = _series(df, other, lr, seed, "landscape", metric)
        return {t: np.log(none[t] / with_norm[t]) for t in STEPS}

    beta = [np.mean(list(log_ratio("beta_eff", "bn", 0.05, s).values())) for s in (0, 1)]
    assert claims[4]["estimate"] == pytest.approx(np.mean(beta), rel=1e-12)
    lp = [np.mean(list(log_ratio("beta_eff", "lp1", 0.05, s).values())) for s in (0, 1)]
    assert "ℓ1 BN" in claims[12]["claim"] and "lr 0.05" in claims[12]["claim"]
    assert claims[12]["estimate"] == pytest.approx(np.mean(lp), rel=1e-12)
    early_late = []
    for seed in (0, 1):
        r = log_ratio("loss_range", "bn", 0.2, seed)
        early_late.append(np.mean([r[0], r[10]]) - np.mean([r[30], r[40]]))  # t <= 40/4, t >= 3·40/4
    assert "early" in claims[7]["claim"] and "lr 0.2" in claims[7]["claim"]
    assert claims[7]["estimate"] == pytest.approx(np.mean(early_late), rel=1e-12)


def test_matched_loss_claim_is_computed_from_records(df, claims):
    """β_eff at matched training-subset loss, lr 0.2, by explicit loops over the raw rows."""
    per_seed = []
    for seed in (0, 1):
        progress, beta = {}, {}
        for v in ("none", "bn"):
            loss = _series(df, v, 0.2, seed, "train_subset", "loss")
            running, best = {}, np.inf
            for t in STEPS:
                best = min(best, loss[t])
                running[t] = best
            progress[v] = running
            beta[v] = _series(df, v, 0.2, seed, "landscape", "beta_eff")
        high = min(progress[v][0] for v in progress)
        low = max(progress[v][40] for v in progress)
        assert low < high
        levels = np.geomspace(high, low, study.MATCH_LEVELS + 2)[1:-1]
        values = []
        for level in levels:
            at = {v: next(t for t in STEPS if progress[v][t] <= level) for v in progress}
            values.append(np.log(beta["none"][at["none"]] / beta["bn"][at["bn"]]))
        per_seed.append(np.mean(values))
    claim = claims[-1]
    assert "matched training loss" in claim["claim"] and "β-smoothness" in claim["claim"]
    assert "lr 0.2" in claim["claim"] and claim["n"] == 2
    assert claim["estimate"] == pytest.approx(np.mean(per_seed), rel=1e-12)


def test_l2_batch_norm_is_batch_norm(tmp_path):
    """ℓ2 BN is BN (why the quick preset leaves it out): same seed, same landscape records."""
    store = RunStore(tmp_path, "landscape", "quick")
    config = replace(TINY, norms=("bn",), lp_ps=("2",), lrs=(0.2,), seeds=1, steps=20)
    assert run_sweep(study.STUDY, config, store, log=lambda s: None).ok
    df = load_runs(tmp_path, "landscape")
    beta = df[(df["probe"] == "landscape") & (df["metric"] == "beta_eff")].pivot_table(
        index="step", columns="variant", values="value"
    )
    assert len(beta) == 3
    np.testing.assert_allclose(beta["lp2"], beta["bn"], rtol=1e-4)
