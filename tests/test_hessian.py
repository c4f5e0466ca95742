"""Hessian probes end to end on the shared tiny float64 cases, against explicit Hessians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from probes.functional import ModelState
from probes.hessian import (
    hessian_density,
    hessian_eigenvalues,
    hessian_outliers,
    hessian_trace,
)
from tests.cases import CASES, explicit_hessian

NAMES = sorted(CASES)


def exact_spectrum(case, **kw) -> np.ndarray:
    H = explicit_hessian(case.model, case.loss_fn, case.batches, bn=case.bn, **kw)
    return torch.linalg.eigvalsh(H).numpy()  # ascending


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigenvalues_match_eigvalsh(name, which):
    case = CASES[name]()
    exact = exact_spectrum(case)
    state = ModelState.capture(case.model)
    result = hessian_eigenvalues(
        case.model, case.loss_fn, case.batches, k=3, which=which, tol=1e-10, bn=case.bn
    )
    assert state.differences(case.model) == []
    expected = {
        "LA": exact[::-1][:3],
        "SA": exact[:3],
        "LM": exact[np.argsort(-np.abs(exact), kind="stable")][:3],
    }
    scale = np.abs(exact).max()
    if which == "LM":  # ties in |λ| may be ordered either way: compare magnitudes, then the set of values
        np.testing.assert_allclose(
            np.abs(result.values), np.abs(expected["LM"]), rtol=1e-6, atol=1e-9 * scale
        )
        for v in result.values:
            assert np.min(np.abs(exact - v)) <= 1e-6 * scale
    else:
        np.testing.assert_allclose(result.values, expected[which], rtol=1e-6, atol=1e-9 * scale)
    assert result.converged and result.n_matvecs > 0


def test_top_eigenvalue_sign_where_power_iteration_is_wrong():
    """The saddle: LM (what power iteration finds) is negative, the largest algebraic one positive."""
    case = CASES["saddle"]()
    exact = np.sort(case.eigenvalues)
    la = hessian_eigenvalues(case.model, case.loss_fn, case.batches, which="LA", tol=1e-10)
    power = hessian_eigenvalues(case.model, case.loss_fn, case.batches, which="LM", method="power", tol=1e-10)
    assert la.values[0] == pytest.approx(exact[-1], rel=1e-6) and la.values[0] > 0
    assert power.values[0] == pytest.approx(exact[0], rel=1e-4) and power.values[0] < 0
    assert abs(exact[0]) > abs(exact[-1])


@pytest.mark.parametrize("name", ["mlp-bn", "vgg-ln", "mlp-dbn"])
def test_trace_within_three_standard_errors(name):
    case = CASES[name]()
    exact = float(torch.trace(explicit_hessian(case.model, case.loss_fn, case.batches, bn=case.bn)))
    for method in ("hutchinson", "hutchpp"):
        result = hessian_trace(case.model, case.loss_fn, case.batches, n_probes=30, method=method, bn=case.bn)
        assert abs(result.value - exact) <= 3 * result.stderr + 1e-9 * abs(exact)
        assert result.n_matvecs <= 30


def test_density_agrees_with_exact_spectrum():
    case = CASES["mlp-bn"]()
    exact = exact_spectrum(case)
    result = hessian_density(case.model, case.loss_fn, case.batches, n_iter=20, n_runs=30, seed=1)
    integral = np.trapezoid(result.density, result.grid)
    assert integral == pytest.approx(1.0, abs=1e-3)
    # each run's quadrature gives vᵀH^j v exactly (j < 2·n_iter); their mean estimates tr(H^j)/n
    for j in (1, 2, 3):
        per_run = len(result.weights) * (result.weights * result.nodes**j).sum(
            axis=1
        )  # weights sum to 1 overall
        assert result.moment(j) == pytest.approx(per_run.mean(), rel=1e-10)
        stderr = per_run.std(ddof=1) / np.sqrt(len(per_run))
        assert abs(per_run.mean() - np.mean(exact**j)) <= 4 * stderr
    # SLQ nodes lie inside the spectrum
    assert result.nodes.min() >= exact.min() - 1e-8 and result.nodes.max() <= exact.max() + 1e-8


def test_outliers_at_a_zero_initialized_head_need_a_block():
    # softmax regression with W = 0, b = 0: H = (I − 11ᵀ/K)/K ⊗ E[x̃ x̃ᵀ], whose top eigenvalue is K − 1
    # times repeated. One start vector sees one copy and took λ_K from below (ratio 1.96 for 1.40 at tol 1e-6)
    from torch import nn
    from torch.nn import functional as F

    d, K, N = 20, 5, 100
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    model = nn.Linear(d, K).double()
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()

    def loss(theta):
        return F.cross_entropy(X @ theta[: d * K].reshape(K, d).T + theta[d * K :], y)

    exact = np.linalg.eigvalsh(torch.func.hessian(loss)(torch.zeros(d * K + K, dtype=torch.float64)))[::-1]
    assert exact[0] - exact[K - 2] < 1e-12 < exact[0] - exact[K - 1]  # the case: K − 1 equal outliers
    block = hessian_outliers(model, F.cross_entropy, (X, y), num_classes=K, tol=1e-8, block_size=K)
    np.testing.assert_allclose(block.values, exact[:K], rtol=1e-7)
    assert block.ratio == pytest.approx(exact[0] / exact[K - 1], rel=1e-7) and block.converged
    top = hessian_eigenvalues(model, F.cross_entropy, (X, y), k=K - 1, tol=1e-8, block_size=K - 1)
    np.testing.assert_allclose(top.values, exact[: K - 1], rtol=1e-7)


def test_outlier_ratio_is_nan_when_lambda_k_is_negative():
    """Hessian diag(2, −2, −4): one positive eigenvalue, so no K = 2 outliers. The probe returned
    λ1/λ2 = −1 as a ratio; it now records NaN and still returns the eigenvalues and gradient fraction."""
    model = nn.Linear(3, 1, bias=False).double()
    X = torch.eye(3, dtype=torch.float64)
    curvature = torch.tensor([1.0, -1.0, -2.0], dtype=torch.float64)

    def loss_fn(out, _):
        return (curvature * out.squeeze(1).pow(2)).sum()

    result = hessian_outliers(model, loss_fn, (X, torch.zeros(3)), num_classes=2, tol=1e-10)
    np.testing.assert_allclose(result.values, [2.0, -2.0], atol=1e-9)
    assert math.isnan(result.ratio) and 0.0 <= result.gradient_fraction <= 1.0


def test_outlier_ratio_is_nan_when_lambda_k_is_an_exact_zero():
    """The last layer's bias (softmax: rank K − 1) and a pre-BN bias (no effect under batch statistics):
    λ3 = 0 exactly, which Lanczos returns as ±1e-17. The ratio was 1.7e16 or NaN by the sign of the
    rounding (seeds 0 and 3 gave ~2e16); a λK at the operator's rounding level now counts as 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    for seed in range(4):
        result = hessian_outliers(
            model, torch.nn.functional.cross_entropy, (X, y), num_classes=3, params=["3.bias", "0.bias"],
            seed=seed, tol=1e-10,
        )  # fmt: skip
        assert abs(result.values[2]) < 1e-15 and math.isnan(result.ratio)


def test_outliers_match_explicit_eigenpairs():
    case = CASES["mlp-none"]()
    H = explicit_hessian(case.model, case.loss_fn, case.batches, bn=case.bn)
    vals, vecs = torch.linalg.eigh(H)
    from probes.functional import functional_loss

    f, theta = functional_loss(case.model, case.loss_fn, case.batches, bn=case.bn)
    g = torch.func.grad(f)(theta)
    K = 3
    top = vecs[:, -K:]
    expected_fraction = float((top.T @ g).pow(2).sum() / g.pow(2).sum())
    result = hessian_outliers(case.model, case.loss_fn, case.batches, num_classes=K, tol=1e-10)
    assert result.ratio == pytest.approx(float(vals[-1] / vals[-K]), rel=1e-6)
    assert result.gradient_fraction == pytest.approx(expected_fraction, rel=1e-6)
    rows = result.to_records()
    assert {r["metric"] for r in rows} >= {"outlier_ratio", "gradient_fraction_top", "eigenvalue_LA"}


def test_per_layer_block_spectrum():
    case = CASES["mlp-bn"]()
    names = [n for n, _ in case.model.named_parameters()][:2]  # the first layer's weight and bias
    exact = exact_spectrum(case, params=names)
    result = hessian_eigenvalues(
        case.model, case.loss_fn, case.batches, k=2, which="LA", tol=1e-10, params=names
    )
    np.testing.assert_allclose(result.values, exact[::-1][:2], rtol=1e-6)
    assert result.layer == ",".join(names)
    assert all(r["layer"] == ",".join(names) for r in result.to_records())


def test_bad_inputs():
    case = CASES["mlp-none"]()
    n = sum(p.numel() for p in case.model.parameters())
    with pytest.raises(ValueError, match="k"):
        hessian_eigenvalues(case.model, case.loss_fn, case.batches, k=n)
    with pytest.raises(ValueError, match="which"):
        hessian_eigenvalues(case.model, case.loss_fn, case.batches, which="BE")
    for k in (0, 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"^num_classes must be an integer >= 2 .*got {k!r}"):
            hessian_outliers(case.model, case.loss_fn, case.batches, num_classes=k)
    too_many = rf"^num_classes must be smaller than the number of parameters n = {n},"
    with pytest.raises(ValueError, match=too_many):
        hessian_outliers(case.model, case.loss_fn, case.batches, num_classes=n)
    with pytest.raises(ValueError, match="batches"):
        hessian_trace(case.model, case.loss_fn, [])
    with pytest.raises(ValueError, match="params"):
        hessian_density(case.model, case.loss_fn, case.batches, params=["nope.weight"])
    half = case.model.to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in case.batches]
    state = ModelState.capture(half)
    with pytest.raises(ValueError, match=r"params: Hessian probes compute in float32 or float64.*bfloat16"):
        hessian_eigenvalues(half, case.loss_fn, batches)
    with pytest.raises(ValueError, match=r"float32 copy: copy.deepcopy\(model\).float\(\)"):
        hessian_trace(half, case.loss_fn, batches, n_probes=4)
    assert state.differences(half) == []
    linear = torch.nn.Linear
    partly = torch.nn.Sequential(linear(3, 4), linear(4, 2).to(torch.bfloat16))  # θ float32, a bf16 layer
    with pytest.raises(ValueError, match=r"params: Hessian probes compute in float32 or float64.*bfloat16"):
        batch = (torch.randn(4, 3), torch.zeros(4))
        hessian_eigenvalues(partly, lambda out, t: out.float().pow(2).mean(), batch)


@pytest.mark.parametrize(
    "probe",
    [
        lambda c: hessian_eigenvalues(c.model, c.loss_fn, c.batches, k=2, bn=c.bn),
        lambda c: hessian_trace(c.model, c.loss_fn, c.batches, n_probes=6, bn=c.bn),
        lambda c: hessian_density(c.model, c.loss_fn, c.batches, n_iter=5, n_runs=2, bn=c.bn),
        lambda c: hessian_outliers(c.model, c.loss_fn, c.batches, num_classes=3, bn=c.bn),
    ],
    ids=["eigenvalues", "trace", "density", "outliers"],
)
@pytest.mark.parametrize("name", ["mlp-bn", "mlp-bn-running", "vgg-dbn"])
def test_every_probe_leaves_the_model_as_found(probe, name):
    case = CASES[name]()
    case.model.train()
    for p in case.model.parameters():
        p.grad = torch.full_like(p, 0.5)  # populated gradients must survive too
    torch.manual_seed(123)
    state = ModelState.capture(case.model)
    probe(case)
    assert state.differences(case.model) == []


@pytest.mark.parametrize("name", ["mlp-bn", "vgg-gn"])
def test_cache_graphs_false_gives_the_same_answers(name):
    """The memory-lean mode (a fresh gradient graph per product) computes the same Hessian: equal
    values, equal product counts, and the model is left as found."""
    case = CASES[name]()
    exact = exact_spectrum(case)
    results = {}
    for cache in (True, False):
        state = ModelState.capture(case.model)
        common = dict(bn=case.bn, cache_graphs=cache)
        results[cache] = (
            hessian_eigenvalues(case.model, case.loss_fn, case.batches, k=2, tol=1e-10, **common),
            hessian_trace(case.model, case.loss_fn, case.batches, n_probes=8, **common),
            hessian_density(case.model, case.loss_fn, case.batches, n_iter=6, n_runs=2, **common),
            hessian_outliers(case.model, case.loss_fn, case.batches, num_classes=2, tol=1e-10, **common),
        )
        assert state.differences(case.model) == []
    (eig_c, tr_c, den_c, out_c), (eig_f, tr_f, den_f, out_f) = results[True], results[False]
    np.testing.assert_allclose(eig_f.values, exact[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(eig_f.values, eig_c.values, rtol=1e-10)
    assert eig_f.n_matvecs == eig_c.n_matvecs
    assert tr_f.value == pytest.approx(tr_c.value, rel=1e-10)
    np.testing.assert_allclose(den_f.density, den_c.density, rtol=1e-8, atol=1e-12)
    assert out_f.gradient_fraction == pytest.approx(out_c.gradient_fraction, rel=1e-8)


def test_counts_given_as_numpy_integers_are_counts():
    """``num_classes=len(np.unique(labels))`` is a numpy integer: every count argument takes one and
    gives what the Python int gives (``hessian_outliers`` accepted it, then failed inside the solver
    with a message about k)."""
    case = CASES["mlp-bn"]()
    args = (case.model, case.loss_fn, case.batches)
    as_numpy, as_int = np.int64(3), 3
    a = hessian_outliers(*args, num_classes=as_numpy, bn=case.bn)
    b = hessian_outliers(*args, num_classes=as_int, bn=case.bn)
    assert (a.ratio, a.gradient_fraction) == (b.ratio, b.gradient_fraction)
    np.testing.assert_array_equal(
        hessian_eigenvalues(*args, k=np.int64(2), bn=case.bn).values,
        hessian_eigenvalues(*args, k=2, bn=case.bn).values,
    )
    assert hessian_trace(*args, n_probes=np.int32(6)).value == hessian_trace(*args, n_probes=6).value
    np.testing.assert_array_equal(
        hessian_density(*args, n_iter=np.int64(5), n_runs=np.int64(2)).density,
        hessian_density(*args, n_iter=5, n_runs=2).density,
    )
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        hessian_outliers(*args, num_classes=np.float64(3.0))


@pytest.mark.parametrize("name", ["mlp-bn", "vgg-ln", "mlp-bn-running"])
def test_start_gradient_leans_lanczos_on_the_loss_gradient(name):
    """``start="gradient"`` is ``spectral.eigenvalues(op, guess=op.gradient())`` and ``"random"`` the
    plain seeded start, product for product; the default is the gradient for k = 1 and random for k ≥ 2
    (``default_start``). All give the explicit top eigenvalues."""
    from probes import spectral
    from probes.hessian import default_start
    from probes.hvp import hessian_operator

    case = CASES[name]()
    exact = exact_spectrum(case)[::-1]
    args = (case.model, case.loss_fn, case.batches)
    assert [default_start(k) for k in (1, np.int64(1), 3)] == ["gradient", "gradient", "random"]
    for k in (1, 3):
        with hessian_operator(*args, bn=case.bn) as op:
            leaned = spectral.eigenvalues(op, k=k, tol=1e-9, seed=2, guess=op.gradient())
            plain = spectral.eigenvalues(op, k=k, tol=1e-9, seed=2)
        state = ModelState.capture(case.model)
        runs = {
            start: hessian_eigenvalues(*args, k=k, tol=1e-9, bn=case.bn, seed=2, start=start)
            for start in (None, "gradient", "random")
        }
        assert state.differences(case.model) == []
        expected = {None: leaned if k == 1 else plain, "gradient": leaned, "random": plain}
        for start, result in runs.items():
            np.testing.assert_array_equal(result.values, expected[start].values)
            assert result.n_matvecs == expected[start].n_matvecs
            np.testing.assert_allclose(result.values, exact[:k], rtol=1e-7)
    with pytest.raises(ValueError, match=r"start must be one of \('gradient', 'random'\) or None, got 'gr"):
        hessian_eigenvalues(*args, start="grad")


def test_start_gradient_with_a_zero_gradient_starts_at_random():
    """A block the loss does not use has a zero gradient: the gradient start is then the random one."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model = nn.ModuleDict({"trunk": trunk, "aux": nn.Linear(5, 3)}).double()
    model.forward = trunk.forward  # the aux head is never used
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    kw = dict(params=model["aux"], k=2, which="LA", seed=1)
    a = hessian_eigenvalues(model, nn.functional.cross_entropy, (x, y), start="gradient", **kw)
    b = hessian_eigenvalues(model, nn.functional.cross_entropy, (x, y), start="random", **kw)
    np.testing.assert_array_equal(a.values, np.zeros(2))
    assert a.n_matvecs == b.n_matvecs
