"""noisy_bn end to end on a reduced config, and its probe (noise on, no side effects) against brute force."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from analysis.load import load_runs
from probes.functional import ModelState
from probes.ics import distribution_shift, layer_input_statistics
from studies import noisy_bn as study
from studies.lab.nets import make_net
from studies.lab.norms import TimeVaryingNoise
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep
from tests.records import diverged_at

TINY = replace(
    study.QUICK,
    seeds=2,
    depth=2,
    width=16,
    steps=60,
    log_every=5,
    probe_every=20,
    eval_every=30,
    probe_size=200,
)
NORMS = ("none", "bn", "noisy_bn", "noise")
LEVELS = ("p5", "p15", "p50", "p85", "p95")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "noisy_bn", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 8
    analyze_study(study.STUDY, TINY, store)
    return store


def test_records_have_the_promised_fields(results):
    df = load_runs(results.root, "noisy_bn")
    assert set(df["norm"]) == set(NORMS) and set(df["seed"]) == {0, 1}
    assert set(df["arch"]) == {"mlp"} and set(df["dataset"]) == {"mnist1d"}
    stats = df[df["probe"] == "layer_input_statistics"]
    assert set(stats["layer"]) == {"blocks.0.act", "blocks.1.act"}
    assert sorted(stats["step"].unique()) == [0, 20, 40, 60]
    assert set(stats["metric"]) == {"mean", "var", *LEVELS}
    # per run, step and layer: 7 means over units + 7 metrics for each of 4 units
    assert len(stats) == 8 * 4 * 2 * 7 * (1 + 4)
    assert set(stats["unit"].dropna()) == {0, 1, 2, 3}
    wide = stats.pivot_table(index=["run_id", "step", "layer", "unit"], columns="metric", values="value")
    for low, high in pairwise(LEVELS):
        assert (wide[low] <= wide[high]).all()
    assert (wide["var"] >= 0).all()
    shift = df[df["probe"] == "distribution_shift"]
    assert sorted(shift["step"].unique()) == [20, 40, 60]  # the shift since the previous probe point
    assert set(shift["metric"]) == {"mean_shift", "var_shift", "wasserstein"} and (shift["value"] >= 0).all()
    assert len(shift) == 8 * 3 * 2 * 3
    train = df[(df["probe"] == "train") & (df["metric"] == "accuracy")]
    assert train["value"].between(0, 1).all() and 59 in set(train["step"])
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    assert acc["value"].between(0, 1).all() and 60 in set(acc["step"])


def test_noise_is_seen_by_the_probe(results):
    """The recorded shifts include the noise: the noisy nets' layer inputs move far more between probes."""
    df = load_runs(results.root, "noisy_bn")
    w1 = df[(df["probe"] == "distribution_shift") & (df["metric"] == "wasserstein")]
    per_norm = w1.groupby("norm")["value"].mean()
    assert per_norm["noisy_bn"] > 5 * per_norm["bn"] and per_norm["noise"] > 5 * per_norm["none"]


def test_figures_and_claims(results):
    figures = results.figures_dir
    for name in study.STUDY.figures:
        assert (figures / f"{name}.pdf").stat().st_size > 1000
        assert (figures / f"{name}.png").stat().st_size > 1000
    claims = json.loads((figures / "claims.json").read_text())
    assert len(claims) == 4
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["n"] == 2 and claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]
        assert claim["source"] == "Santurkar et al. 2018, Fig. 2"


def test_claims_are_computed_from_records(results):
    """Every claim's estimate equals a brute-force recomputation from the raw rows."""
    df = load_runs(results.root, "noisy_bn")
    acc, shift = {}, {}
    for (norm, seed), run in df.groupby(["norm", "seed"]):
        rows = run[(run["probe"] == "train") & (run["metric"] == "accuracy")]
        values = [v for s, v in zip(rows["step"], rows["value"], strict=True) if s >= 0.9 * TINY.steps]
        acc[norm, seed] = np.mean(values)  # steps 55 and 59 of 60 updates
        rows = run[(run["probe"] == "distribution_shift") & (run["metric"] == "wasserstein")]
        shift[norm, seed] = np.mean([np.mean(layer["value"]) for _, layer in rows.groupby("layer")])
    expected = [
        np.mean([acc["noisy_bn", s] - acc["bn", s] for s in (0, 1)]),
        np.mean([acc["noisy_bn", s] - acc["none", s] for s in (0, 1)]),
        np.mean([np.log(shift["noisy_bn", s] / shift["none", s]) for s in (0, 1)]),
        np.mean([acc["noise", s] - acc["none", s] for s in (0, 1)]),
    ]
    claims = json.loads((results.figures_dir / "claims.json").read_text())
    assert [c["estimate"] for c in claims] == pytest.approx(expected, rel=1e-12)
    assert [c["criterion"] for c in claims] == [
        "95% CI lower bound > -0.02",
        "95% CI lower bound > 0",
        "95% CI lower bound > 0",
        "95% CI upper bound < 0",
    ]


def _net(norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_net("mlp", norm=norm, in_shape=(6,), num_classes=3, depth=2, width=5)


def test_probe_matches_a_plain_forward_with_the_noise_on():
    """Percentiles and W1 of the probe against a hand-run forward (noise on, seeded) and scipy."""
    model, x = _net("noisy_bn"), torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    layers = ["blocks.0.act", "blocks.1.act"]
    a = study.input_statistics_as_trained(model, x, layers, seed=3)
    b = study.input_statistics_as_trained(model, x, layers, seed=4)
    samples = {}
    for seed in (3, 4):
        trial = _net("noisy_bn")
        for m in trial.modules():
            if hasattr(m, "track_running_stats"):
                m.track_running_stats = False  # batch statistics, no running update; noise stays on
        torch.manual_seed(seed)
        h = trial.blocks[0].norm(trial.blocks[0].layer(x))
        samples[seed] = h.detach().double().numpy()  # (50, 5): the input of blocks.0.act
    first = a["blocks.0.act"]
    np.testing.assert_allclose(first.mean, samples[3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(first.percentiles, np.percentile(samples[3], [5, 15, 50, 85, 95], axis=0))
    w1 = [wasserstein_distance(samples[3][:, u], samples[4][:, u]) for u in range(5)]
    shift = distribution_shift(a, b)["blocks.0.act"]
    assert shift.wasserstein == pytest.approx(np.mean(w1), rel=1e-6) and shift.wasserstein > 0.1


def test_probe_is_reproducible_and_leaves_no_trace():
    model, x = _net("noisy_bn"), torch.randn(40, 6)
    model(torch.randn(40, 6))  # one training forward: running statistics away from their init
    torch.manual_seed(123)
    state = ModelState.capture(model)
    a = study.input_statistics_as_trained(model, x, ["blocks.1.act"], seed=7)
    assert state.differences(model) == []  # parameters, buffers, flags, grads and the global RNG
    again = study.input_statistics_as_trained(model, x, ["blocks.1.act"], seed=7)
    other = study.input_statistics_as_trained(model, x, ["blocks.1.act"], seed=8)
    np.testing.assert_array_equal(a.layers[0].sorted_samples, again.layers[0].sorted_samples)
    assert not np.allclose(a.layers[0].mean, other.layers[0].mean)
    noise_off = layer_input_statistics(model, x, layers=["blocks.1.act"], bn="batch")
    assert not np.allclose(a.layers[0].mean, noise_off.layers[0].mean)
    assert all(m.training for m in model.modules() if isinstance(m, TimeVaryingNoise))
    assert study.noise_seed(0, 20) != study.noise_seed(0, 40) != study.noise_seed(1, 20)


def test_without_noise_the_probe_is_the_shared_one():
    """For BN (no random layer) the probe is ``layer_input_statistics(bn="batch")``, whatever the seed."""
    model, x = _net("bn"), torch.randn(40, 6)
    ours = study.input_statistics_as_trained(model, x, ["blocks.0.act", "blocks.1.act"], seed=1)
    shared = layer_input_statistics(
        model, x, layers=["blocks.0.act", "blocks.1.act"], bn="batch", percentiles=(5, 15, 50, 85, 95)
    )
    for a, b in zip(ours.layers, shared.layers, strict=True):
        assert a.layer == b.layer
        np.testing.assert_allclose(a.sorted_samples, b.sorted_samples, rtol=1e-12)
        np.testing.assert_allclose(a.percentiles, b.percentiles, rtol=1e-12)


def test_runs_are_deterministic(results, tmp_path):
    store = RunStore(tmp_path, "noisy_bn", "quick")
    run_sweep(study.STUDY, replace(TINY, seeds=1, norms=("noisy_bn",)), store, log=lambda s: None)
    (run_id,) = store.run_ids()
    assert store.load(run_id)[1] == results.load(run_id)[1]


def test_a_diverged_run_leaves_every_claim_it_is_in(results):
    """Claims 1, 2 and 4 dropped a diverged run; claim 3 (instability) kept the shifts from before it
    blew up. Now every claim leaves its pair out."""
    df = load_runs(results.root, "noisy_bn")
    run = df[(df["norm"] == "noisy_bn") & (df["seed"] == 0)]["run_id"].iloc[0]
    claims = study.claims(diverged_at(df, run, 40))
    assert [c.n for c in claims] == [1, 1, 1, 2]  # claim 4 compares noise with none
