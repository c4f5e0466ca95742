"""hessian_spectrum end to end on a reduced config: records, population BN, figure, claims from records."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.load import load_runs
from studies import hessian_spectrum as study
from studies.lab.nets import make_net
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep

TINY = replace(
    study.QUICK,
    mlp_depths=(2, 3),
    mlp_width=16,
    norms=("none", "bn", "popbn"),
    seeds=2,
    steps=10,
    eval_every=5,
    probe_steps=(0, 5, 10),
    early_step=5,
    probe_size=64,
    trace_probes=6,
    density_steps=(10,),
    density_iter=8,
    density_runs=2,
    pop_size=200,
    pop_every=5,
)
K = 10  # MNIST-1D classes


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "hessian_spectrum", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 2 * 3 * 2
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "hessian_spectrum")


def test_records_have_the_promised_fields(df):
    assert set(df["norm"]) == {"none", "bn", "popbn"} and set(df["seed"]) == {0, 1}
    assert set(df["net"]) == {"mlp"} and set(df["depth"]) == {2, 3} and set(df["arch"]) == {"mlp"}
    hess = df[df["probe"] == "hessian"]
    assert not (df["metric"] == "failed").any()
    assert sorted(hess["step"].unique()) == [0, 5, 10]
    views = hess.groupby("norm")[["bn", "view"]].apply(lambda p: set(zip(p["bn"], p["view"], strict=True)))
    assert views["none"] == {("batch", "train")}
    assert views["bn"] == {("batch", "train"), ("running", "inference")}
    assert views["popbn"] == {("running", "train")}
    eig = hess[hess["metric"] == "eigenvalue"]
    for _, part in eig.groupby(["run_id", "step", "view"]):
        values = part.sort_values("index")["value"].to_numpy()
        assert len(values) == K and np.all(np.diff(values) <= 0)
    fraction = hess[hess["metric"] == "gradient_fraction"]["value"]
    assert len(fraction) == 2 * 2 * 4 * 3 and fraction.between(0, 1).all()
    assert np.isfinite(hess[hess["metric"] == "trace"]["value"]).all()
    density = df[df["probe"] == "hessian_density"]
    assert set(density["step"]) == {10}
    sums = density.groupby(["run_id", "view"])["value"].sum()
    assert len(sums) == 2 * 2 * 4 and np.allclose(sums, 1.0)


def test_bn_views_differ_and_are_recorded_at_the_same_steps(df):
    """BN's training loss (batch statistics) and inference net (running statistics) are different losses."""
    rows = df[(df["probe"] == "hessian") & (df["norm"] == "bn") & (df["metric"] == "loss")]
    wide = rows.pivot_table(index=["run_id", "step"], columns="view", values="value")
    assert len(wide) == 2 * 2 * 3 and not np.allclose(wide["train"], wide["inference"])


def test_population_statistics_are_those_of_the_population_normalized_net():
    torch.manual_seed(0)
    model = make_net("mlp", norm="bn", in_shape=(12,), num_classes=3, depth=3, width=8, init="kaiming")
    x = torch.randn(500, 12) * 3 + 1
    study.refresh_population_statistics(model, x)
    norms = [block.norm for block in model.blocks]
    assert all(not m.training and m.momentum == 0.1 for m in norms)
    assert all(m.training for m in (model, model.head, *(b.layer for b in model.blocks)))
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for m in norms]
    with torch.no_grad():
        model(x)  # BN normalizes with the stored statistics: each layer sees the same inputs as the pass
    for h in hooks:
        h.remove()
    for m, z in zip(norms, inputs, strict=True):
        torch.testing.assert_close(m.running_mean, z.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.running_var, z.var(0, unbiased=False), atol=1e-4, rtol=1e-4)


def test_population_refresher_refreshes_every_n_updates():
    torch.manual_seed(0)
    model = make_net("mlp", norm="bn", in_shape=(12,), num_classes=3, depth=2, width=8)
    x = torch.randn(300, 12)
    on_step = study.population_refresher(model, x, pop_size=100, every=5, seed=0)
    first = model.blocks[0].norm.running_mean.clone()
    with torch.no_grad():
        model.blocks[0].layer.weight.mul_(2.0)
    on_step(SimpleNamespace(step=2), 0.0)  # state 3: no refresh
    torch.testing.assert_close(model.blocks[0].norm.running_mean, first)
    on_step(SimpleNamespace(step=4), 0.0)  # state 5: refresh
    assert not torch.allclose(model.blocks[0].norm.running_mean, first)


def test_figure_and_claims(results):
    figures = results.figures_dir
    assert (figures / "hessian_spectrum.pdf").stat().st_size > 1000
    assert (figures / "hessian_spectrum.png").stat().st_size > 1000
    claims = json.loads((figures / "claims.json").read_text())
    assert len(claims) == 3 * 2 + 2  # claims 1-3 per depth, claim 4 at matched step and matched loss
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["n"] == 2 and claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]


def _brute(df, norm: str, depth: int, seed: int):
    """(step → λ1, λK, loss) of a run's training view, from the raw rows."""
    rows = df[
        (df["probe"] == "hessian")
        & (df["view"] == "train")
        & (df["norm"] == norm)
        & (df["depth"] == depth)
        & (df["seed"] == seed)
    ]
    out = {}
    for step, part in rows.groupby("step"):
        eig = part[part["metric"] == "eigenvalue"].sort_values("index")["value"].to_numpy()
        loss = float(part[part["metric"] == "loss"]["value"].iloc[0])
        out[int(step)] = (eig[0], eig[K - 1], loss)
    return out


def test_claims_are_computed_from_records(results, df):
    """Claim 1 (depth 3) and claim 4 at matched loss, recomputed by brute force from the raw rows."""
    claims = json.loads((results.figures_dir / "claims.json").read_text())
    by_name = {c["claim"]: c for c in claims}

    def log_ratio(norm: str, seed: int) -> float:
        lam1, lamk, _ = _brute(df, norm, 3, seed)[5]
        return np.log(lam1 / lamk)

    expected = np.mean([log_ratio("none", s) - log_ratio("bn", s) for s in (0, 1)])
    claim = by_name[
        "Without BN the outlier ratio λ1/λK (Ghorbani et al.'s measure) is larger early in training "
        "(MLP, depth 3, step 5)"
    ]
    assert claim["estimate"] == pytest.approx(expected, rel=1e-9)

    def matched(depth: int, seed: int) -> float:
        runs = {n: _brute(df, n, depth, seed) for n in ("none", "bn")}
        target = max(min(v[2] for v in run.values()) for run in runs.values())
        lam = {}
        for n, run in runs.items():
            steps = sorted(run)
            k = next(i for i, s in enumerate(steps) if run[s][2] <= target)
            (lam_k, _, loss_k), (lam_j, _, loss_j) = run[steps[k]], run[steps[max(k - 1, 0)]]
            # where the loss crosses L*, linearly between the probe steps around it
            lam[n] = (
                lam_k if k == 0 or loss_k == target else np.interp(target, [loss_k, loss_j], [lam_k, lam_j])
            )
        return np.log(lam["none"] / lam["bn"])

    expected = np.mean([matched(3, s) - matched(2, s) for s in (0, 1)])
    name = "BN's smoothing of the top eigenvalue is stronger in deep than shallow nets"
    name += " (MLP, depth 3 vs 2, matched loss)"
    assert by_name[name]["estimate"] == pytest.approx(expected, rel=1e-9)
