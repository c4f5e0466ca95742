"""norm_zoo end to end on a reduced config: records, tables, figure, claims recomputed from raw records."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analysis.load import load_runs
from studies import norm_zoo as study
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep

TINY = replace(
    study.QUICK,
    archs=("mlp", "vgg", "transformer"),
    norms=("none", "bn", "ln", "in", "dbn"),
    mlp_width=16,
    vgg_depth=2,
    vgg_width=4,
    transformer_depth=1,
    transformer_width=8,
    steps=20,
    log_every=2,
    loss_window=2,
    target_loss=2.2,
    ladder_lrs=(0.1, 1.0),
    ladder_steps=8,
    ladder_log_every=2,
    probe_size=32,
    trace_probes=4,
)
PAIRS = 4 + 5 + 4  # (arch, norm) that apply: `in` needs positions, so not in the mlp or transformer


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "norm_zoo", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == PAIRS * (2 + 2)  # 2 seeds + 2 ladder lrs
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "norm_zoo", config_columns=study.STUDY.config_columns)


@pytest.fixture(scope="module")
def claims(results):
    return json.loads((results.figures_dir / "claims.json").read_text())


def test_grid_leaves_out_what_does_not_apply():
    runs = study.grid(TINY)
    pairs = {(r["arch"], r["norm"]) for r in runs}
    assert ("mlp", "in") not in pairs and ("transformer", "in") not in pairs and ("vgg", "in") in pairs
    assert len(pairs) == PAIRS and not study.applicable("mlp", "in") and study.applicable("resnet", "in")


def test_records_have_the_promised_fields(df):
    assert {"kind", "lr", "arch", "norm", "seed", "step", "probe", "layer", "metric", "value"} <= set(
        df.columns
    )
    assert not (df["metric"] == "failed").any()
    main, ladder = df[df["kind"] == "main"], df[df["kind"] == "ladder"]
    assert set(main["lr"]) == {TINY.lr} and set(ladder["lr"]) == {0.1, 1.0}
    probes = {"hessian", "landscape", "ics", "conditioning", "batch_stats"}
    assert not set(ladder["probe"]) & probes and probes <= set(main["probe"])
    for _, run in main.groupby(["arch", "norm", "seed"]):
        measured = run[run["probe"].isin(probes)]
        assert set(measured["step"]) == {TINY.steps}  # probe_init is off: end of training only
        metrics = set(zip(measured["probe"], measured["metric"], strict=True))
        assert {("hessian", "lambda_max"), ("hessian", "trace"), ("landscape", "beta_eff"),
                ("ics", "relative_l2"), ("conditioning", "condition_number")} <= metrics  # fmt: skip
    kappa = main[main["metric"] == "condition_number"]
    assert (kappa["value"] >= 1).all()
    # a layer with nothing before it has no ICS row: the mlp's first layer
    assert "blocks.0.layer" not in set(main[(main["probe"] == "ics") & (main["arch"] == "mlp")]["layer"])


def test_tables(results):
    runs = pd.read_csv(results.figures_dir / "norm_zoo_runs.csv")
    assert len(runs) == PAIRS * 2
    assert runs["test_accuracy"].between(0, 1).all() and runs["steps_to_target"].between(0, TINY.steps).all()
    ladder = pd.read_csv(results.figures_dir / "norm_zoo_ladder.csv")
    assert len(ladder) == PAIRS and set(ladder["max_stable_lr"]) <= {0.01, 0.1, 1.0}  # below: 0.1 / 10
    assert set(ladder["lr_censored"].fillna("")) <= {"", "above", "below"}
    table = pd.read_csv(results.figures_dir / "norm_zoo_table.csv")
    assert len(table) == 3 * 5
    na = table[~table["applicable"]]
    assert set(zip(na["arch"], na["norm"], strict=True)) == {("mlp", "in"), ("transformer", "in")}
    assert (na["n"] == 0).all() and (table[table["applicable"]]["n"] == 2).all()
    assert {"test_accuracy_mean", "lambda_max_sd", "cond_median_mean", "max_stable_lr_mean"} <= set(table)


def test_figure_and_claims(results, claims):
    figures = results.figures_dir
    assert (figures / "norm_zoo.pdf").stat().st_size > 1000
    assert (figures / "norm_zoo.png").stat().st_size > 1000
    assert len(claims) == 4 + 1 + 1  # none/bn (4), dbn vs bn, ln vs bn in the transformer
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
    assert [c["n"] for c in claims[:2]] == [6, 6] and claims[2]["n"] == 3 and claims[5]["n"] == 2


def _final(df: pd.DataFrame, probe: str, metric: str) -> dict[tuple, float]:
    rows = df[(df["kind"] == "main") & (df["probe"] == probe) & (df["metric"] == metric)]
    last = rows[rows["step"] == TINY.steps]
    return {(r.arch, r.norm, r.seed): r.value for r in last.itertuples()}


def test_claims_are_computed_from_records(df, claims):
    """Accuracy, λmax, stable-lr and LN-vs-BN estimates recomputed from the raw rows."""
    acc = _final(df, "eval", "test_accuracy")
    main = df[df["kind"] == "main"]
    diverged = {(r.arch, r.norm, r.seed) for r in main[main["metric"] == "diverged"].itertuples()}
    acc = {k: (0.1 if k in diverged else v) for k, v in acc.items()}
    keys = [(a, s) for a in TINY.archs for s in (0, 1)]
    assert claims[0]["estimate"] == pytest.approx(
        np.mean([acc[a, "bn", s] - acc[a, "none", s] for a, s in keys])
    )
    lam = _final(df, "hessian", "lambda_max")
    ratios = [np.log(lam[a, "none", s] / lam[a, "bn", s]) for a, s in keys if (a, "none", s) in lam]
    assert claims[3]["estimate"] == pytest.approx(np.mean([r for r in ratios if np.isfinite(r)]))
    best = {}
    for arch in TINY.archs:
        for norm in ("none", "bn"):
            stable = []
            for lr in TINY.ladder_lrs:
                run = df[
                    (df["kind"] == "ladder") & (df["arch"] == arch) & (df["norm"] == norm) & (df["lr"] == lr)
                ]
                loss = run[(run["probe"] == "train") & (run["metric"] == "loss")].set_index("step")["value"]
                late = loss[loss.index >= 0.75 * TINY.ladder_steps]
                classes = run.loc[run["metric"] == "num_classes", "value"].iloc[0]
                if not (run["metric"] == "diverged").any() and late.mean() < min(loss[0], np.log(classes)):
                    stable.append(lr)
            best[arch, norm] = max(stable) if stable else 0.01
    expected = np.mean([np.log(best[a, "bn"] / best[a, "none"]) for a in TINY.archs])
    assert claims[2]["estimate"] == pytest.approx(expected)
    ln = [acc["transformer", "ln", s] - acc["transformer", "bn", s] for s in (0, 1)]
    assert claims[5]["estimate"] == pytest.approx(np.mean(ln)) and claims[5]["criterion"].endswith("> -0.02")


def test_a_ladder_run_that_collapses_to_chance_is_not_stable():
    # the no-norm VGG starts at 2.95 > log 10 and settles at a uniform prediction's 2.35: its loss fell,
    # but it did not train. It used to count as stable, and BN's larger stable lr claim then failed
    def run(lr, losses, classes=10.0):
        rows = [
            {"step": 10 * i, "probe": "train", "metric": "loss", "value": v} for i, v in enumerate(losses)
        ]
        rows.append({"step": 0, "probe": "data", "metric": "num_classes", "value": classes})
        return [{**r, "arch": "vgg", "norm": "none", "seed": 0, "kind": "ladder", "lr": lr} for r in rows]

    config = replace(TINY, ladder_lrs=(0.1, 1.0, 3.0), ladder_steps=40)
    df = pd.DataFrame(
        run(0.1, [2.95, 2.0, 1.6, 1.4, 1.3])
        + run(1.0, [2.95, 2.35, 2.34, 2.36, 2.35])
        + run(3.0, [2.95, 2.8, 2.6, 2.5, 2.4], classes=20.0)  # below log 20 = 3.0 and its start: trained
    )
    table = study.ladder_table(df, config)
    assert table.loc[("vgg", "none", 0), "max_stable_lr"] == 3.0
    df = df[df["lr"] != 3.0]
    assert study.ladder_table(df, config).loc[("vgg", "none", 0), "max_stable_lr"] == 0.1


def test_steps_to_target_censors():
    losses = pd.DataFrame({"step": [0, 10, 20, 30], "value": [2.3, 1.5, 0.9, 0.7]})
    assert study.steps_to_target(losses, 1.2, 2, 40) == (20, False)  # mean(1.5, 0.9) = 1.2
    assert study.steps_to_target(losses, 0.5, 2, 40) == (40, True)


def test_linear_layer_conditioning_uses_the_feature_dimension():
    """The transformer's linear layers see (N, T, C): κ is that of the (N·T, C) covariance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(16, 5, 3) * torch.tensor([1.0, 2.0, 5.0])
    kappa = study.layer_input_condition_numbers(model, (x, torch.zeros(16)))
    cov = np.cov(x.reshape(-1, 3).double().numpy(), rowvar=False, bias=True)
    assert kappa["0"] == pytest.approx(np.linalg.cond(cov), rel=1e-6)
    assert set(kappa) == {"0", "1"}


def test_a_raising_forward_counts_as_divergence(monkeypatch):
    """DBN's eigh can fail on exploding activations: the run is recorded as diverged, censored, chance."""

    def explode(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(study, "train", explode)
    (rc,) = [
        r for r in study.grid(replace(TINY, archs=("mlp",), norms=("dbn",), seeds=1)) if r["kind"] == "main"
    ]
    rows = study.run(rc, study.RunContext())
    assert [r["metric"] for r in rows] == ["diverged", "num_classes"] and "LinAlgError" in rows[0]["error"]
    df = pd.DataFrame(
        [{**r, "arch": "mlp", "norm": "dbn", "seed": 0, "kind": "main", "lr": TINY.lr} for r in rows]
    )
    (table,) = study.run_table(df, TINY).to_dict("records")
    assert table["diverged"] and table["censored"] and table["steps_to_target"] == TINY.steps
    assert table["test_accuracy"] == pytest.approx(0.1)
