"""depth end to end on a reduced config: records, figure, claims recomputed from the raw records."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from analysis.load import load_runs
from probes.gradients import BN_RELU_GRADIENT_GROWTH
from studies import depth as study
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep

TINY = replace(
    study.QUICK,
    seeds=2,
    grad_depths=(3, 6),
    grad_width=32,
    grad_batch=32,
    rank_depths=(2, 8),
    rank_width=16,
    rank_batch=16,
    rank_norms=("none", "bn", "ln"),
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "depth", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 2 * 2 + 2 * 3 * 2  # gradient: norms x seeds; rank: nets x ...
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "depth", config_columns=study.STUDY.config_columns)


@pytest.fixture(scope="module")
def claims(results):
    return json.loads((results.figures_dir / "claims.json").read_text())


def test_records_have_the_promised_fields(df):
    assert set(df["step"]) == {0} and set(df["seed"]) == {0, 1} and set(df["dataset"]) == {"mnist1d"}
    grad = df[df["experiment"] == "gradient"]
    assert set(grad["arch"]) == {"mlp"} and set(grad["norm"]) == {"none", "bn"}
    assert set(grad["metric"]) == set(study.GRADIENT_METRICS)
    norms = grad[grad["metric"] == "grad_norm"]
    for depth in TINY.grad_depths:  # the hidden-to-hidden layers blocks.1 … blocks.{L−1}, in order
        at = norms[(norms["net_depth"] == depth) & (norms["run_id"] == norms["run_id"].iloc[0])]
        assert list(at["layer"]) == [f"blocks.{i}.layer" for i in range(1, depth)]
        assert list(at["layer_index"]) == list(range(depth - 1))
    assert (norms["value"] > 0).all()
    rank = df[df["experiment"] == "rank"]
    assert set(rank["net"]) == {"linear", "relu"} and set(rank["arch"]) == {"dln", "mlp"}
    assert set(rank["metric"]) == set(study.RANK_METRICS)
    eff = rank[rank["metric"] == "effective_rank"]
    assert len(eff) == 2 * 3 * 2 * len(TINY.rank_depths)
    assert eff["value"].between(1 - 1e-9, TINY.rank_width).all()


def test_bn_representation_is_centered(df):
    """With BN before the identity, the head's input is centered per feature: the uncentered and the
    centered soft ranks agree (a check that the probe saw BN in batch mode)."""
    rank = df[(df["experiment"] == "rank") & (df["net"] == "linear") & (df["norm"] == "bn")]
    wide = rank.pivot_table(index=["run_id", "net_depth"], columns="metric", values="value")
    assert np.allclose(wide["effective_rank"], wide["centered_effective_rank"], rtol=1e-3)


def test_figure_and_claims(results, claims):
    figures = results.figures_dir
    assert (figures / "depth.pdf").stat().st_size > 1000 and (figures / "depth.png").stat().st_size > 1000
    assert len(claims) == 3 + 3 * 2
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["n"] == 2 and claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]


def test_claims_are_computed_from_records(df, claims):
    """Growth rates refitted from the per-layer gradient norms, and the rank claims, by brute force."""
    grad = df[(df["experiment"] == "gradient") & (df["net_depth"] == max(TINY.grad_depths))]
    rates = {}
    for (norm, seed), run in grad.groupby(["norm", "seed"]):
        g = run[run["metric"] == "grad_norm"].sort_values("layer_index")["value"].to_numpy()
        slope = np.polyfit(np.arange(len(g))[::-1], np.log(g), 1)[0]  # x: distance from the output
        rates[norm, seed] = math.exp(slope)
        recorded = run[run["metric"] == "growth_rate"]["value"].item()
        assert recorded == pytest.approx(rates[norm, seed], rel=1e-9)
    expected = np.mean([abs(math.log(rates["bn", s] / BN_RELU_GRADIENT_GROWTH)) for s in (0, 1)])
    assert claims[0]["estimate"] == pytest.approx(expected, rel=1e-9)
    assert claims[1]["estimate"] == pytest.approx(np.mean([rates["bn", s] - 1 for s in (0, 1)]), rel=1e-9)
    assert claims[2]["estimate"] == pytest.approx(np.mean([abs(math.log(rates["none", s])) for s in (0, 1)]))

    rank = df[(df["experiment"] == "rank") & (df["metric"] == "effective_rank")]
    for i, net in enumerate(("linear", "relu")):
        r = {
            (norm, seed, depth): value
            for norm, seed, depth, value in rank[rank["net"] == net][
                ["norm", "seed", "net_depth", "value"]
            ].itertuples(index=False)
        }
        collapse = np.mean([math.log(r["none", s, 8] / r["none", s, 2]) for s in (0, 1)])
        floor = np.mean([r["bn", s, 8] for s in (0, 1)])
        gain = np.mean([math.log(r["bn", s, 8] / r["none", s, 8]) for s in (0, 1)])
        got = [c["estimate"] for c in claims[3 + 3 * i : 6 + 3 * i]]
        assert got == pytest.approx([collapse, floor, gain], rel=1e-9)


def test_bn_gradients_explode_at_moderate_width():
    """A sanity check of the physics on one wider net: BN's fitted rate is near √(π/(π−1)), not 1."""
    wide = replace(TINY, seeds=1, grad_norms=("bn",), grad_depths=(12,), grad_width=128, grad_batch=128)
    rc = next(rc for rc in study.grid(wide) if rc["experiment"] == "gradient")
    rows = study.run(rc, study.RunContext())
    rate = next(r["value"] for r in rows if r["metric"] == "growth_rate")
    assert abs(math.log(rate / BN_RELU_GRADIENT_GROWTH)) < 0.1
