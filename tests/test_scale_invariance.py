"""scale_invariance end to end on a reduced config: records, the norm identity, figure, claims."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from analysis.load import load_runs
from studies import scale_invariance as study
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep
from tests.records import diverged_at

TINY = replace(study.QUICK, seeds=2, depth=2, width=16, steps=40, probe_every=10, eval_every=20)
HIDDEN = {"blocks.0.layer", "blocks.1.layer"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "scale_invariance", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 2 * 2 * 2
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "scale_invariance", config_columns=("weight_decay",))


def test_records_have_the_promised_fields(df):
    assert set(df["norm"]) == {"bn", "wn"} and set(df["seed"]) == {0, 1}
    assert set(df["weight_decay"]) == {0.0, 0.01} and set(df["arch"]) == {"mlp"}
    assert not (df["metric"] == "failed").any()
    eff = df[df["probe"] == "effective_lr"]
    assert sorted(eff["step"].unique()) == [0, 10, 20, 30, 40]
    assert set(eff["layer"]) == HIDDEN | {"head"} and set(eff["metric"]) == {
        "lr",
        "weight_norm",
        "effective_lr",
    }
    wide = eff.pivot_table(index=["run_id", "step", "layer"], columns="metric", values="value")
    assert np.allclose(wide["effective_lr"], wide["lr"] / wide["weight_norm"] ** 2)
    growth = df[df["probe"] == "norm_growth"]
    assert set(growth["layer"]) == HIDDEN
    updates = growth[growth["metric"] == "updates"]
    assert (updates["value"] == updates["step"]).all()
    inv = df[df["probe"] == "scale_invariance"]
    assert set(inv[inv["metric"] == "loss_change"]["scale"]) == {0.5, 2.0}


def test_norm_identity_holds_update_by_update(df):
    """Without WD the measured growth of ‖W‖² equals Σ η²‖∇L‖²; with WD, that plus the decay term.

    Exact (up to float32 rounding) for WN's direction V; BN's ε makes ⟨∇W, W⟩ slightly non-zero.
    """
    growth = df[df["probe"] == "norm_growth"].pivot_table(
        index=["norm", "weight_decay", "step", "layer"], columns="metric", values="value"
    )
    growth = growth.reset_index()
    growth = growth[growth["step"] > 0]
    for norm, rtol in (("wn", 1e-4), ("bn", 1e-2)):
        part = growth[growth["norm"] == norm]
        assert np.allclose(part["measured"], part["gradient_term"] + part["decay_term"], rtol=rtol, atol=0)
    no_wd = growth[growth["weight_decay"] == 0]
    assert (no_wd["decay_term"] == 0).all() and (no_wd["measured"] > 0).all()


def test_head_is_not_scale_invariant_but_hidden_layers_are(df):
    cos = df[(df["probe"] == "scale_invariance") & (df["metric"] == "grad_weight_cosine")]
    hidden = cos[cos["layer"].isin(HIDDEN)]["value"].abs()
    assert hidden.max() < 1e-3
    assert cos[cos["layer"] == "head"]["value"].abs().max() > 1e-2


def test_figure_and_claims(results):
    figures = results.figures_dir
    assert (figures / "scale_invariance.pdf").stat().st_size > 1000
    assert (figures / "scale_invariance.png").stat().st_size > 1000
    claims = json.loads((figures / "claims.json").read_text())
    assert len(claims) == 7 * 2
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["n"] == 2 and claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]


def test_claims_are_computed_from_records(results, df):
    """Claims 1, 3 and 6 (BN) recomputed by brute force from the raw rows."""
    claims = json.loads((results.figures_dir / "claims.json").read_text())
    bn = df[df["norm"] == "bn"]
    total, error, cosine = [], [], []
    for seed in (0, 1):
        run = bn[(bn["seed"] == seed) & (bn["weight_decay"] == 0)]
        eff = run[(run["probe"] == "effective_lr") & (run["metric"] == "effective_lr")]
        logs = []
        for layer in sorted(HIDDEN):
            values = eff[eff["layer"] == layer].set_index("step")["value"]
            logs.append(np.log(values[40] / values[0]))
        total.append(np.mean(logs))
        growth = run[(run["probe"] == "norm_growth") & (run["step"] == 40)]
        errors = []
        for layer in sorted(HIDDEN):
            row = growth[growth["layer"] == layer].set_index("metric")["value"]
            errors.append(abs(row["measured"] - row["gradient_term"]) / row["gradient_term"])
        error.append(max(errors))
        both = bn[(bn["seed"] == seed) & (bn["probe"] == "scale_invariance")]
        cos = both[(both["metric"] == "grad_weight_cosine") & both["layer"].isin(HIDDEN)]
        cosine.append(cos["value"].abs().max())
    assert claims[0]["estimate"] == pytest.approx(np.mean(total), rel=1e-12)
    assert claims[2]["estimate"] == pytest.approx(np.mean(error), rel=1e-9)
    assert claims[5]["estimate"] == pytest.approx(np.mean(cosine), rel=1e-12)
    assert claims[0]["holds"] and claims[2]["holds"]


def test_a_diverged_run_leaves_the_claims_at_step_t(df):
    """Claims 1–5 read the end of training: a diverged run has none (claim 1 dropped it, claims 2–3 read
    its last probe before the divergence as step T). Claims 6–7 test every probe point and keep the
    ones before it."""
    run = df[(df["norm"] == "bn") & (df["weight_decay"] == 0) & (df["seed"] == 0)]["run_id"].iloc[0]
    claims = study.claims(diverged_at(df, run, 30))
    assert [c.n for c in claims[:7]] == [1, 1, 1, 2, 1, 2, 2]  # BN: claims 4 (WD only) and 6–7 keep 2
    assert [c.n for c in claims[7:]] == [2] * 7  # WN untouched
