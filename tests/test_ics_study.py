"""The ics study end to end on a reduced config: records, figures, claims computed from the records."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from analysis.load import load_runs
from studies import ics as study
from studies.lab.data import load_dataset
from studies.lab.nets import make_net
from studies.lab.store import RunStore
from studies.lab.sweep import analyze_study, run_sweep

TINY = replace(
    study.QUICK,
    seeds=2,
    steps=20,
    probe_every=10,
    eval_every=10,
    vgg_depth=3,
    vgg_width=4,
    dln_depth=5,
    dln_width=8,
    dln_n_train=512,
    dln_n_test=256,
)
STEPS = [0, 10, 20]
RECORDED = {"vgg": [2, 3, 4], "dln": [2, 3, 4, 5, 6]}  # layer #: convs/linears then the head; not #1


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = RunStore(root, "ics", "quick")
    report = run_sweep(study.STUDY, TINY, store, log=lambda s: None)
    assert report.ok and len(report.ran) == 8
    analyze_study(study.STUDY, TINY, store)
    return store


@pytest.fixture(scope="module")
def df(results):
    return load_runs(results.root, "ics")


def test_grid_gives_each_arch_its_own_setup():
    runs = study.grid(TINY)
    assert len(runs) == 2 * 2 * 2
    by_arch = {r["arch"]: r for r in runs}
    assert by_arch["vgg"]["dataset"] == "mnist1d" and by_arch["vgg"]["lr"] == 0.1
    assert by_arch["dln"]["dataset"] == "gaussian" and by_arch["dln"]["lr"] == 0.01
    assert by_arch["dln"]["depth"] == 5 and by_arch["dln"]["init"] == "orthogonal"
    assert study.QUICK.dln_depth == 25 and study.QUICK.probe_bn == "batch"
    with pytest.raises(ValueError, match="archs must be among vgg, dln"):
        study.grid(replace(TINY, archs=("mlp",)))


def test_records_have_the_promised_fields(df):
    assert set(df["arch"]) == {"vgg", "dln"} and set(df["norm"]) == {"none", "bn"}
    assert set(df["seed"]) == {0, 1}
    assert set(df[df["arch"] == "vgg"]["dataset"]) == {"mnist1d"}
    assert set(df[df["arch"] == "dln"]["dataset"]) == {"gaussian"}
    ics = df[df["probe"] == "ics"]
    assert set(ics["metric"]) == set(study.METRICS)
    for (arch, _run), run in ics.groupby(["arch", "run_id"]):
        assert sorted(run["step"].unique()) == STEPS
        assert sorted(run["layer_index"].astype(int).unique()) == RECORDED[arch]
        assert len(run) == len(STEPS) * len(RECORDED[arch]) * len(study.METRICS)
        assert "blocks.0.layer" not in set(run["layer"]) and "head" in set(run["layer"])
    wide = ics.pivot_table(index=["run_id", "layer", "step"], columns="metric", values="value")
    assert (wide["l2"] > 0).all() and wide["cosine"].between(-1, 1).all()
    np.testing.assert_allclose(wide["relative_l2"], wide["l2"] / wide["grad_norm"], rtol=1e-6)
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy")]
    assert acc["value"].between(0, 1).all() and sorted(acc["step"].unique()) == STEPS


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_ics_at_init_matches_a_hand_computed_update(df, norm):
    """Layer 2 of the DLN at step 0: G and G' by plain autograd with block 0 moved by one SGD step."""
    rc = next(r for r in study.grid(TINY) if r["arch"] == "dln" and r["norm"] == norm and r["seed"] == 0)
    train_set, _ = load_dataset("gaussian", n_train=rc["n_train"], n_test=rc["n_test"])
    torch.manual_seed(0)
    net = make_net(
        "dln",
        norm=norm,
        in_shape=(40,),
        num_classes=10,
        depth=rc["depth"],
        width=rc["width"],
        init="orthogonal",
    )
    index = torch.randperm(rc["n_train"], generator=torch.Generator().manual_seed(0))[: rc["batch_size"]]
    x, y = train_set.tensors[0][index], train_set.tensors[1][index]  # the batch of update 0

    def layer2_grad(model: torch.nn.Module) -> torch.Tensor:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.blocks[1].layer.parameters()))
        return torch.cat([g.reshape(-1) for g in grads])

    g = layer2_grad(copy.deepcopy(net))
    moved = copy.deepcopy(net)
    block0 = list(moved.blocks[0].parameters())  # the layer's weight and bias (and BN's γ, β)
    grads = torch.autograd.grad(F.cross_entropy(moved(x), y), block0)
    with torch.no_grad():
        for p, grad in zip(block0, grads, strict=True):
            p -= rc["lr"] * grad
    g2 = layer2_grad(moved)
    rows = df[(df["probe"] == "ics") & (df["arch"] == "dln") & (df["norm"] == norm) & (df["seed"] == 0)]
    got = rows[(rows["step"] == 0) & (rows["layer"] == "blocks.1.layer")].set_index("metric")["value"]
    assert got["l2"] == pytest.approx(float((g - g2).norm()), rel=1e-4)
    assert got["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
    assert got["cosine"] == pytest.approx(float(F.cosine_similarity(g, g2, dim=0)), abs=1e-6)


def test_figures_and_claims(results):
    figures = results.figures_dir
    for name in study.STUDY.figures:
        assert (figures / f"{name}.pdf").stat().st_size > 1000
        assert (figures / f"{name}.png").stat().st_size > 1000
    claims = json.loads((figures / "claims.json").read_text())
    assert len(claims) == 8
    for claim in claims:
        assert {"claim", "source", "statistic", "estimate", "ci_low", "ci_high", "n", "holds"} <= set(claim)
        assert claim["n"] == 2 and claim["ci_low"] <= claim["estimate"] <= claim["ci_high"]
    assert [c["criterion"] for c in claims] == ["95% CI upper bound >= 0"] * 4 + [
        "95% CI upper bound < 0",
        "95% CI upper bound >= 0",
        "95% CI lower bound > 0",
        "95% CI lower bound > 0",
    ]


def test_claims_are_computed_from_records(results, df):
    """The VGG ℓ2 and DLN cosine claims' estimates equal a brute-force recomputation from the raw rows."""
    ics = df[df["probe"] == "ics"]

    def value(arch: str, norm: str, seed: int, metric: str) -> dict[tuple[str, int], float]:
        rows = ics[(ics["arch"] == arch) & (ics["norm"] == norm) & (ics["seed"] == seed)]
        rows = rows[rows["metric"] == metric]
        return {(r.layer, r.step): r.value for r in rows.itertuples()}

    log_ratio, cos_diff = [], []
    for seed in (0, 1):
        bn, none = value("vgg", "bn", seed, "l2"), value("vgg", "none", seed, "l2")
        log_ratio.append(np.mean([np.log(bn[k] / none[k]) for k in bn]))
        bn, none = value("dln", "bn", seed, "cosine"), value("dln", "none", seed, "cosine")
        cos_diff.append(np.mean([bn[k] - none[k] for k in bn]))
    claims = json.loads((results.figures_dir / "claims.json").read_text())
    assert claims[0]["estimate"] == pytest.approx(np.mean(log_ratio), rel=1e-12)
    assert claims[4]["estimate"] == pytest.approx(np.mean(cos_diff), rel=1e-9, abs=1e-12)
    acc = df[(df["probe"] == "eval") & (df["metric"] == "test_accuracy") & (df["step"] == 20)]
    acc = acc[acc["arch"] == "dln"].sort_values("seed")
    diff = acc[acc["norm"] == "bn"]["value"].to_numpy() - acc[acc["norm"] == "none"]["value"].to_numpy()
    assert claims[7]["estimate"] == pytest.approx(diff.mean(), rel=1e-12)


def test_runs_are_deterministic(results, tmp_path):
    store = RunStore(tmp_path, "ics", "quick")
    run_sweep(study.STUDY, replace(TINY, seeds=1, archs=("dln",), norms=("bn",)), store, log=lambda s: None)
    (run_id,) = store.run_ids()
    assert store.load(run_id)[1] == results.load(run_id)[1]


def test_one_arch_and_a_last_step_off_the_probe_grid(tmp_path):
    """A sweep of the DLN alone draws its figures and writes its claims (the VGG's have no runs: n = 0;
    the claims step raised 'level name seed is not the name of the index'), and the probe runs at the
    last step though ``probe_every`` does not divide ``steps`` (it stopped at 10 of 15)."""
    config = replace(TINY, archs=("dln",), seeds=1, steps=15)
    store = RunStore(tmp_path, "ics", "quick")
    assert run_sweep(study.STUDY, config, store, log=lambda s: None).ok
    analyze_study(study.STUDY, config, store)
    claims = {c["claim"]: c for c in json.loads((store.figures_dir / "claims.json").read_text())}
    assert len(claims) == 8
    assert all((c["n"] == 0) == ("VGG" in c["claim"]) for c in claims.values())
    steps = set(load_runs(store.root, "ics").query("probe == 'ics'")["step"])
    assert steps == {0, 10, 15}
