"""A probe that fails is a recorded row with its reason, and training goes on.

``ProbeFailure`` is how a probe says "I ran but cannot vouch for this value" (e.g. Lanczos did not
converge); any other exception is recorded the same way, its ``str`` as the reason.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from studies import edge_of_stability as eos
from studies.lab.data import load_dataset
from studies.lab.nets import make_net
from studies.lab.study import RunContext
from studies.lab.train import ProbeFailure, ProbeSchedule, TrainConfig, failure_reason, train


def blobs(n: int = 64, dim: int = 5, seed: int = 0) -> TensorDataset:
    """Two Gaussian blobs, labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=g) * 0.5 + (2.0 * y[:, None] - 1.0)
    return TensorDataset(x, y)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def failed_rows(records: list[dict]) -> list[dict]:
    return [r for r in records if r["metric"] == "failed"]


def test_failure_reason_is_the_message_or_the_class_name():
    assert failure_reason(ProbeFailure("Lanczos did not converge")) == "Lanczos did not converge"
    assert failure_reason(ValueError("bad input: x")) == "bad input: x"
    assert failure_reason(RuntimeError()) == "RuntimeError"
    assert issubclass(ProbeFailure, RuntimeError)


def test_probe_failure_records_its_reason_and_training_goes_on():
    message = "Lanczos did not converge: 3 of 5 eigenvalues within tol 0.001 after 40 matvecs"

    def unconverged(ctx):
        if ctx.step in (2, 4):
            raise ProbeFailure(message)
        return [{"metric": "lambda_max", "value": 1.0}]

    def plain(ctx):
        if ctx.step == 4:
            raise KeyError("missing")
        return [{"metric": "ok", "value": 2.0}]

    config = TrainConfig(steps=6, batch_size=16, eval_every=3)
    result = train(
        small_net(),
        blobs(),
        config=config,
        test_set=blobs(32, seed=1),
        probes=[ProbeSchedule(unconverged, every=2, name="sharp"), ProbeSchedule(plain, every=2, name="p")],
    )
    assert result.steps_done == 6 and not result.diverged
    failed = failed_rows(result.records)
    assert [(r["probe"], r["step"]) for r in failed] == [("sharp", 2), ("sharp", 4), ("p", 4)]
    sharp = [r for r in failed if r["probe"] == "sharp"]
    assert all(r["reason"] == message and math.isnan(r["value"]) for r in sharp)
    assert all(r["error"] == repr(ProbeFailure(message)) for r in sharp)
    (generic,) = [r for r in failed if r["probe"] == "p"]
    assert generic["reason"] == "'missing'" and generic["error"] == "KeyError('missing')"
    values = [r["step"] for r in result.records if r["metric"] == "lambda_max"]
    assert values == [0, 6]  # the failed steps record no value
    assert [r["step"] for r in result.records if r["metric"] == "test_loss"] == [0, 3, 6]


def test_unconverged_sharpness_is_a_failed_row_with_its_reason():
    """edge_of_stability's probe with a Lanczos budget too small to converge: every probe step records
    ``failed`` with the reason (tol, matvecs), training runs to the end, the final evaluation is there."""
    train_set, test_set = load_dataset("mnist1d")
    subset = TensorDataset(*(t[:100] for t in train_set.tensors))
    torch.manual_seed(0)
    model = make_net("mlp", norm="bn", in_shape=(40,), num_classes=10, depth=2, width=16, activation="tanh")
    config = TrainConfig(lr=0.1, full_batch=True, steps=12, eval_every=6, log_every=3)
    budget = 3
    probes = [ProbeSchedule(eos.sharpness_probe(1e-3, 0, max_matvecs=budget), every=4, name="sharpness")]
    result = train(model, subset, config=config, loss_fn=eos.squared_loss, test_set=test_set, probes=probes)
    assert result.steps_done == 12 and not result.diverged
    failed = failed_rows(result.records)
    assert [r["step"] for r in failed] == [0, 4, 8, 12]
    for row in failed:
        assert row["probe"] == "sharpness" and math.isnan(row["value"])
        assert "did not converge" in row["reason"]
        assert "tol 0.001" in row["reason"] and f"within {budget} matvecs" in row["reason"]
        assert "ProbeFailure" in row["error"]
    assert not [r for r in result.records if r["probe"] == "sharpness" and r["metric"] != "failed"]
    final = {r["metric"] for r in result.records if r["probe"] == "eval" and r["step"] == 12}
    assert final == {"test_loss", "test_accuracy"}
    logged = [r["step"] for r in result.records if r["probe"] == "train" and r["metric"] == "loss"]
    assert logged == [0, 3, 6, 9, 11]


def test_converged_sharpness_keeps_its_rows():
    """The same probe with the default budget converges: its value rows, and no failure."""
    (rc,) = eos.grid(replace(eos.QUICK, seeds=1, lrs=(0.1,), norms=("bn",)))
    rc = {**rc, "n_train": 100, "width": 16, "steps": 2, "probe_every": 2, "eval_every": 2}
    rows = eos.run(rc, RunContext())
    assert not failed_rows(rows)
    sharp = {(r["step"], r["metric"]): r["value"] for r in rows if r["probe"] == "sharpness"}
    assert {m for _, m in sharp} == {"lambda_max", "n_matvecs", "converged"}
    assert sharp[(0, "converged")] == 1.0 and sharp[(2, "converged")] == 1.0
    assert sharp[(0, "lambda_max")] > 0


@pytest.mark.parametrize("budget", [0, -1])
def test_bad_budget_is_a_clear_error(budget):
    torch.manual_seed(0)
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    model = make_net("mlp", norm="none", in_shape=(40,), num_classes=10, depth=1, width=4)
    ctx = SimpleNamespace(model=model, loss_fn=eos.squared_loss, batch=(x, y))
    with pytest.raises(ValueError, match="max_matvecs must be a positive integer"):
        eos.sharpness_probe(1e-3, 0, max_matvecs=budget)(ctx)


def test_norm_zoo_hessian_probe_refuses_an_unconverged_lambda_max(monkeypatch):
    """norm_zoo records λmax only when Lanczos vouches for it: an unconverged result (forced by a
    stand-in eigensolver) raises ProbeFailure with the estimate, tol and budget; a converged one is kept."""
    from probes.spectral import EigenResult
    from studies import norm_zoo

    def stand_in(converged):
        def eig(*args, **kwargs):
            return EigenResult(
                values=np.array([7.5]), vectors=None, n_matvecs=40, converged=converged, which="LA"
            )

        return eig

    torch.manual_seed(0)
    model = make_net("mlp", norm="bn", in_shape=(40,), num_classes=10, depth=2, width=8)
    batch = (torch.randn(16, 40), torch.randint(0, 10, (16,)))
    rc = {
        "eig_tol": 1e-3,
        "seed": 0,
        "trace_probes": 4,
        "lr": 0.1,
        "step_multipliers": (1.0,),
        "batch_size": 8,
    }
    ctx = SimpleNamespace(model=model, loss_fn=nn.functional.cross_entropy, device=torch.device("cpu"))
    probe = norm_zoo.zoo_probes(batch, rc)["hessian"]
    monkeypatch.setattr(norm_zoo, "hessian_eigenvalues", stand_in(False))
    with pytest.raises(
        ProbeFailure, match=r"λmax of the Hessian \(estimate 7\.5\) did not reach tol 0\.001 within 40"
    ):
        probe(ctx)
    monkeypatch.setattr(norm_zoo, "hessian_eigenvalues", stand_in(True))
    rows = {r["metric"]: r["value"] for r in probe(ctx)}
    assert rows["lambda_max"] == 7.5 and math.isfinite(rows["trace"])
