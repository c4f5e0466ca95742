"""The CUDA path end to end: probes, the Hessian operator and every study agree with the CPU.

All tests here are marked ``gpu`` and skip without CUDA; on a GPU machine run ``pytest -m gpu``.

* Every probe on the tiny float64 nets of :mod:`tests.cases` gives the same records on ``cuda`` as on
  ``cpu`` (rtol 1e-8; random start and probe vectors are drawn on the CPU, so a seed gives the same
  vectors on both) and leaves the model, its gradients and every RNG (the CUDA ones included) as found.
* ``hessian_operator``'s products, gradient and loss on ``cuda`` equal the CPU's, for both HVP methods.
* Each study's reduced (smoke-test) config runs with ``RunContext(device="cuda")``: no probe fails, the
  same (probe, metric) keys have finite values as on CPU, and a deterministic measurement (the test loss
  at initialization, or the study's step-0 probe values) matches the CPU run's. TF32 is switched off for
  these comparisons, so float32 agrees to rounding.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from probes.conditioning import (
    covariance_spectrum,
    gd_iterations_to_tolerance,
    kfac_factor_conditioning,
    layer_input_conditioning,
    least_squares_conditioning,
    normalization_disturbance,
    rank_collapse,
)
from probes.functional import ModelState
from probes.gradients import (
    effective_learning_rates,
    layer_gradient_norms,
    scale_invariance,
    update_to_weight_ratios,
)
from probes.hessian import (
    hessian_density,
    hessian_eigenvalues,
    hessian_operator,
    hessian_outliers,
    hessian_trace,
)
from probes.ics import ics_gradient_change, layer_input_statistics
from probes.smoothness import landscape_along_gradient
from studies.lab.study import RunContext
from tests.cases import CASES, NUM_CLASSES, Case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with `pytest -m gpu`)"),
]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
PROBE_CASES = ("mlp-bn", "mlp-bn-running", "vgg-bn", "mlp-dbn", "vgg-iternorm", "mlp-wn", "vgg-gn")


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """Full float32 precision on the GPU (cuDNN convolutions default to TF32), restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------
# helpers


def on(case: Case, device: torch.device) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A copy of the case's model and its batches on ``device`` (the case itself is not moved)."""
    model = copy.deepcopy(case.model).to(device)
    return model, [(x.to(device), y.to(device)) for x, y in case.batches]


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def as_rows(result: Any) -> list[dict[str, Any]]:
    """Tidy rows of any probe result: ``to_records()``, a dict of results, or a tensor / array."""
    if hasattr(result, "to_records"):
        return result.to_records()
    if isinstance(result, dict):
        return [{"key": k, **row} for k, v in result.items() for row in as_rows(v)]
    values = result.detach().cpu().numpy() if isinstance(result, Tensor) else np.asarray(result)
    return [{"index": i, "value": float(v)} for i, v in enumerate(values.ravel())]


def assert_rows_close(cuda: list[dict], cpu: list[dict], *, rtol: float, atol: float, what: str) -> None:
    """Row by row: the same keys, equal non-float entries, float entries within tolerance."""
    assert len(cuda) == len(cpu), f"{what}: {len(cuda)} rows on cuda, {len(cpu)} on cpu"
    for a, b in zip(cuda, cpu, strict=True):
        assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a)} vs {sorted(b)}"
        for key in a:
            if isinstance(b[key], float) or isinstance(a[key], float):
                np.testing.assert_allclose(
                    float(a[key]), float(b[key]), rtol=rtol, atol=atol, err_msg=f"{what}: {b} [{key}]"
                )
            else:
                assert a[key] == b[key], f"{what}: {key} = {a[key]!r} on cuda, {b[key]!r} on cpu"


# ----------------------------------------------------------------------------------------------------
# probes: cuda == cpu, state untouched


Probe = Callable[[nn.Module, list[tuple[Tensor, Tensor]], Case], Any]


def hidden_kfac(model: nn.Module, batches: list[tuple[Tensor, Tensor]], case: Case) -> Any:
    """K-FAC factors of the hidden ``nn.Linear``/``nn.Conv2d`` layers. Not the head's: its G is singular
    by construction (softmax gradients sum to 0 over the classes), so its rank and κ (inf) are decided
    by rounding at the threshold, on either device."""
    hidden = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n != "head"]
    if not hidden:
        pytest.skip("no hidden nn.Linear or nn.Conv2d layer (weight-normalized layers are wrappers)")
    return kfac_factor_conditioning(model, case.loss_fn, batches, layers=hidden, bn=case.bn)


PROBES: dict[str, Probe] = {
    "eigenvalues_LA": lambda m, b, c: hessian_eigenvalues(m, c.loss_fn, b, k=2, tol=1e-10, bn=c.bn),
    "eigenvalues_SA": lambda m, b, c: hessian_eigenvalues(
        m, c.loss_fn, b, k=2, which="SA", tol=1e-10, bn=c.bn
    ),
    "eigenvalues_LM_scipy": lambda m, b, c: hessian_eigenvalues(
        m, c.loss_fn, b, k=2, which="LM", tol=1e-10, method="scipy", bn=c.bn
    ),
    "eigenvalues_forward_over_reverse": lambda m, b, c: hessian_eigenvalues(
        m, c.loss_fn, b, tol=1e-10, hvp="forward_over_reverse", bn=c.bn
    ),
    "trace_hutchpp": lambda m, b, c: hessian_trace(m, c.loss_fn, b, n_probes=12, bn=c.bn),
    "trace_hutchinson": lambda m, b, c: hessian_trace(
        m, c.loss_fn, b, n_probes=8, method="hutchinson", bn=c.bn
    ),
    "density": lambda m, b, c: hessian_density(m, c.loss_fn, b, n_iter=8, n_runs=2, bn=c.bn),
    "outliers": lambda m, b, c: hessian_outliers(
        m, c.loss_fn, b, num_classes=NUM_CLASSES, tol=1e-10, bn=c.bn
    ),
    "ics": lambda m, b, c: ics_gradient_change(m, c.loss_fn, b, optimizer_for(m), bn=c.bn),
    "input_statistics": lambda m, b, c: layer_input_statistics(m, b, bn=c.bn),
    "landscape": lambda m, b, c: landscape_along_gradient(m, c.loss_fn, b, step_sizes=[0.01, 0.3], bn=c.bn),
    "input_conditioning": lambda m, b, c: layer_input_conditioning(m, b, bn=c.bn),
    "kfac": hidden_kfac,
    "rank_collapse": lambda m, b, c: rank_collapse(m, b[0], bn=c.bn),
    "gradient_norms": lambda m, b, c: layer_gradient_norms(m, c.loss_fn, b, bn=c.bn),
    "update_ratios": lambda m, b, c: update_to_weight_ratios(m, c.loss_fn, b, optimizer_for(m), bn=c.bn),
    "effective_lr": lambda m, b, c: effective_learning_rates(m, optimizer_for(m)),
    "scale_invariance": lambda m, b, c: scale_invariance(m, c.loss_fn, b, layer="blocks.0.layer", bn=c.bn),
}


@pytest.mark.parametrize("name", PROBE_CASES)
@pytest.mark.parametrize("probe", list(PROBES))
def test_probe_on_cuda_equals_cpu_and_leaves_state(name: str, probe: str):
    case = CASES[name]()
    results = {}
    for label, device in (("cpu", CPU), ("cuda", CUDA)):
        model, batches = on(case, device)
        state = ModelState.capture(model)
        assert device.type != "cuda" or "cuda" in state.rng  # the CUDA RNG is part of the guarded state
        results[label] = as_rows(PROBES[probe](model, batches, case))
        assert state.differences(model) == [], f"{probe} changed the model on {device}"
        assert all(p.device.type == device.type for p in model.parameters())
    assert_rows_close(results["cuda"], results["cpu"], rtol=1e-8, atol=1e-10, what=f"{probe} on {name}")


def test_data_probes_on_cuda_equal_cpu():
    """The probes on data matrices accept CUDA tensors and give the CPU's numbers."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64) * torch.logspace(0, 1, 6, dtype=torch.float64)
    y = x @ torch.randn(6, generator=gen, dtype=torch.float64)
    measures: dict[str, Callable[[Tensor, Tensor], Any]] = {
        "covariance_spectrum": lambda x, y: covariance_spectrum(x),
        "least_squares_conditioning": lambda x, y: least_squares_conditioning(x),
        "gd_iterations_to_tolerance": lambda x, y: gd_iterations_to_tolerance(x, y, tol=1e-4),
        "snd_zca": lambda x, y: normalization_disturbance(x, method="zca", batch_size=16, n_batches=4),
        "snd_iternorm": lambda x, y: normalization_disturbance(
            x, method="iternorm", batch_size=16, group_size=3, n_batches=4
        ),
    }
    for what, measure in measures.items():
        cpu = as_rows(measure(x, y))
        cuda = as_rows(measure(x.to(CUDA), y.to(CUDA)))
        assert_rows_close(cuda, cpu, rtol=1e-8, atol=1e-10, what=what)


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("name", ["mlp-bn", "vgg-bn", "mlp-bn-running", "mlp-dbn"])
def test_hessian_operator_on_cuda_equals_cpu(name: str, method: str):
    case = CASES[name]()
    ops = {}
    for label, device in (("cpu", CPU), ("cuda", CUDA)):
        model, batches = on(case, device)
        ops[label] = hessian_operator(model, case.loss_fn, batches, bn=case.bn, method=method)
    cpu, cuda = ops["cpu"], ops["cuda"]
    assert cuda.device.type == CUDA.type and cuda.shape == cpu.shape and cuda.method == method
    gen = torch.Generator().manual_seed(1)
    block = torch.randn(cpu.shape[0], 3, generator=gen, dtype=torch.float64)  # (n, 3)
    torch.testing.assert_close(cuda.matvec(block.to(CUDA)).cpu(), cpu.matvec(block), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        cuda.matvec(block[:, 0]).cpu(), cpu.matvec(block[:, 0]), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        cuda.to_scipy().matvec(block[:, 1].numpy()),
        cpu.to_scipy().matvec(block[:, 1].numpy()),
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(cuda.gradient().cpu(), cpu.gradient(), rtol=1e-10, atol=1e-12)
    assert math.isclose(cuda.loss(), cpu.loss(), rel_tol=1e-12)
    assert cuda.n_matvecs == cpu.n_matvecs == 5
    cpu.close()
    cuda.close()


def test_auto_hvp_method_on_cuda_is_double_backward():
    """Unmeasured on GPU, ``auto`` keeps the CPU's measured choice (probes.hvp.AUTO_METHODS)."""
    model, batches = on(CASES["mlp-bn"](), CUDA)
    with hessian_operator(model, CASES["mlp-bn"]().loss_fn, batches) as op:
        assert op.method == "double_backward"


# ----------------------------------------------------------------------------------------------------
# studies: one smoke run on cuda against the same run on cpu

#: study → (its smoke-test module in tests/, which run configs of that module's TINY grid to run)
STUDY_RUNS: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "activation_drift": ("test_activation_drift", lambda rc: rc["norm"] == "bn"),
    "batch_size": ("test_batch_size", lambda rc: rc["norm"] == "bn" and rc["batch_size"] == 8),
    "depth": ("test_depth", lambda rc: rc["norm"] == "bn"),
    "edge_of_stability": ("test_edge_of_stability", lambda rc: rc["norm"] == "bn" and rc["lr"] == 0.1),
    "hessian_spectrum": (
        "test_hessian_spectrum",
        lambda rc: rc["norm"] in ("bn", "popbn") and rc["depth"] == 2,
    ),
    "ics": ("test_ics_study", lambda rc: rc["norm"] == "bn"),
    "landscape": ("test_landscape", lambda rc: rc["variant"] in ("bn", "lp1") and rc["lr"] == 0.05),
    "learning_rate": ("test_learning_rate", lambda rc: rc["norm"] == "bn" and rc["lr"] == 0.01),
    "noisy_bn": ("test_noisy_bn", lambda rc: rc["norm"] == "noisy_bn"),
    "norm_zoo": (
        "test_norm_zoo",
        lambda rc: (
            rc["kind"] == "main"
            and (rc["arch"], rc["norm"])
            in {("mlp", "bn"), ("mlp", "dbn"), ("vgg", "bn"), ("transformer", "ln")}
        ),
    ),
    "placement": ("test_placement", lambda rc: rc["variant"] == "bn_before" and rc["activation"] == "relu"),
    "scale_invariance": ("test_scale_invariance", lambda rc: rc["norm"] in ("bn", "wn")),
    "whitening": (
        "test_whitening",
        lambda rc: rc["part"] != "training" or rc["variant"] in ("dbn", "iternorm"),
    ),
}

#: (probe, metric) measured before any update that must agree between devices (default: the test loss
#: at initialization; the depth study only measures at initialization, and two parts of the whitening
#: study compute on the CPU whatever the device).
STEP0: dict[str, set[tuple[str, str]]] = {
    "depth": {
        ("gradient_norms", "grad_norm"),
        ("gradient_norms", "growth_rate"),
        ("rank_collapse", "effective_rank"),
        ("rank_collapse", "stable_rank"),
    },
    "whitening": {
        ("eval", "test_loss"),
        ("least_squares", "condition_number"),
        ("least_squares", "iterations"),
        ("normalization_disturbance", "snd_mean"),
    },
}


def _identity(row: dict[str, Any]) -> tuple:
    """What names a measurement: every key but the value, the failure text and float-valued keys."""
    return tuple(
        sorted(
            (k, v)
            for k, v in row.items()
            if k not in ("value", "error", "reason") and not isinstance(v, float)
        )
    )


def _grouped(rows: list[dict[str, Any]]) -> dict[tuple, list[float]]:
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault(_identity(row), []).append(float(row["value"]))
    return groups


def _finite_keys(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(r["probe"], r["metric"]) for r in rows if math.isfinite(float(r["value"]))}


@pytest.mark.parametrize("name", list(STUDY_RUNS))
def test_study_smoke_run_on_cuda_matches_cpu(name: str):
    test_module, chosen = STUDY_RUNS[name]
    study = importlib.import_module(f"studies.{name}")
    tiny = importlib.import_module(f"tests.{test_module}").TINY
    configs = [rc for rc in study.STUDY.grid(replace(tiny, seeds=1)) if chosen(rc)]
    assert configs, f"{name}: the selection matches no run of the smoke config"
    for rc in configs:
        cpu = study.STUDY.run(rc, RunContext(device="cpu"))
        cuda = study.STUDY.run(rc, RunContext(device=CUDA.type))
        where = f"{name} {rc}"
        failed = [(r["probe"], r.get("reason")) for r in cuda if r["metric"] == "failed"]
        assert not failed, f"{where}: probes failed on cuda: {failed}"
        assert not [r for r in cpu if r["metric"] == "failed"], f"{where}: probes failed on cpu"
        assert not [r for r in cuda if r["metric"] == "diverged"], f"{where}: diverged on cuda"
        assert {(r["probe"], r["metric"]) for r in cuda} == {(r["probe"], r["metric"]) for r in cpu}, where
        assert _finite_keys(cuda) == _finite_keys(cpu), where
        a, b = _grouped(cuda), _grouped(cpu)
        assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}, where
        wanted = STEP0.get(name, {("eval", "test_loss")})
        compared = [
            k for k in b if dict(k).get("step") == 0 and (dict(k)["probe"], dict(k)["metric"]) in wanted
        ]
        assert compared, f"{where}: no step-0 rows of {sorted(wanted)} to compare"
        for key in compared:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-7, err_msg=f"{where}: {dict(key)}")
