"""The landscape along the gradient against explicit evaluations on copies, and a quadratic's closed form."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from probes.functional import ModelState
from probes.smoothness import landscape_along_gradient
from tests.cases import CASES, make_batch

ETAS = [1e-3, 0.1, 0.5, 2.0]


def plain_loss_and_grad(model, loss_fn, batches, bn, flat: Tensor | None = None):
    """L and ∇L by plain autograd on a deep copy (train mode for bn="batch", eval for "running")."""
    m = copy.deepcopy(model)
    m.train() if bn == "batch" else m.eval()  # running-stat updates of the copy do not matter
    params = [p for p in m.parameters() if p.requires_grad]
    if flat is not None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, params)
    total = sum(x.shape[0] for x, _ in batches)
    loss = sum(x.shape[0] / total * loss_fn(m(x), y) for x, y in batches)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name", ["mlp-none", "mlp-bn", "mlp-bn-running", "vgg-bn", "mlp-ln", "saddle"])
def test_matches_explicit_steps_on_copies(name):
    case = CASES[name]()
    if name == "mlp-bn":  # two batches: the sample-weighted mean loss
        case.batches = [*case.batches, make_batch("mlp", 5, seed=11)]
    state = ModelState.capture(case.model)
    result = landscape_along_gradient(case.model, case.loss_fn, case.batches, step_sizes=ETAS, bn=case.bn)
    assert state.differences(case.model) == []

    w = torch.nn.utils.parameters_to_vector(case.model.parameters()).detach()
    loss0, g = plain_loss_and_grad(case.model, case.loss_fn, case.batches, case.bn)
    losses, dists = [], []
    for eta in ETAS:
        loss, grad = plain_loss_and_grad(case.model, case.loss_fn, case.batches, case.bn, w - eta * g)
        losses.append(loss)
        dists.append(float(torch.linalg.vector_norm(g - grad)))
    losses, dists = np.array(losses), np.array(dists)
    betas = dists / (np.array(ETAS) * float(g.norm()))

    np.testing.assert_allclose(result.step_sizes, ETAS)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-12)
    np.testing.assert_allclose(result.grad_distances, dists, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(result.betas, betas, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(result.relative_losses, losses / loss0, rtol=1e-12)
    assert result.loss == pytest.approx(loss0, rel=1e-12)
    assert result.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    all_losses = np.concatenate([[loss0], losses])
    assert result.loss_range == pytest.approx(all_losses.max() - all_losses.min(), rel=1e-10, abs=1e-14)
    assert result.max_grad_distance == pytest.approx(dists.max(), rel=1e-9)
    assert result.beta_eff == pytest.approx(betas.max(), rel=1e-9)
    assert result.n_diverged == 0 and result.n_grad_evals == len(ETAS) + 1


class Quadratic(nn.Module):
    """A parameter w whose loss (through :meth:`loss_fn`) is L(w) = ½ wᵀAw + bᵀw; inputs are ignored."""

    def __init__(self, A: Tensor, b: Tensor, w: Tensor) -> None:
        super().__init__()
        self.A, self.b = A, b
        self.w = nn.Parameter(w.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.w

    def loss_fn(self, w: Tensor, target: Tensor) -> Tensor:
        return 0.5 * w @ self.A @ w + self.b @ w


def quadratic(d: int = 5, seed: int = 0) -> Quadratic:
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    A = M @ M.T + 0.1 * torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    return Quadratic(A, b, w)


def test_quadratic_closed_form():
    """g = Aw + b; ∇L(w) − ∇L(w − ηg) = ηAg, so β(η) = ‖Ag‖/‖g‖ for every η — not gᵀAg/gᵀg."""
    q = quadratic()
    batch = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))
    etas = np.array([1e-3, 0.01, 0.3, 1.0, 5.0])
    r = landscape_along_gradient(q, q.loss_fn, batch, step_sizes=etas)
    w = q.w.detach()
    A, b = q.A, q.b
    g = A @ w + b
    loss0 = float(0.5 * w @ A @ w + b @ w)
    beta = float(torch.linalg.vector_norm(A @ g) / torch.linalg.vector_norm(g))
    assert beta == pytest.approx(math.sqrt(float(g @ A @ A @ g / (g @ g))), rel=1e-14)
    assert abs(beta - float(g @ A @ g / (g @ g))) > 1e-3  # the Rayleigh quotient of A is different
    np.testing.assert_allclose(r.betas, beta, rtol=1e-10)
    assert r.beta_eff == pytest.approx(beta, rel=1e-10)
    # L(w − ηg) = L(w) − η‖g‖² + ½η² gᵀAg
    expected = loss0 - etas * float(g @ g) + 0.5 * etas**2 * float(g @ A @ g)
    np.testing.assert_allclose(r.losses, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.relative_losses, expected / loss0, rtol=1e-10)
    np.testing.assert_allclose(r.grad_distances, etas * float(torch.linalg.vector_norm(A @ g)), rtol=1e-10)
    all_losses = np.concatenate([[loss0], expected])
    assert r.loss_range == pytest.approx(all_losses.max() - all_losses.min(), rel=1e-10)
    assert r.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)


@pytest.mark.parametrize("n_batches", [1, 2])
def test_cost_is_grid_plus_one_gradient_evaluations(n_batches):
    case = CASES["mlp-bn"]()
    batches = [make_batch("mlp", 6, seed=20 + i) for i in range(n_batches)]
    forwards, backwards = [], []
    h1 = case.model.register_forward_hook(lambda *_: forwards.append(1))
    h2 = case.model.head.register_full_backward_hook(lambda *_: backwards.append(1))
    try:
        r = landscape_along_gradient(case.model, case.loss_fn, batches, step_sizes=ETAS)
    finally:
        h1.remove()
        h2.remove()
    assert len(forwards) == n_batches * (len(ETAS) + 1)
    assert len(backwards) == n_batches * (len(ETAS) + 1)
    assert r.n_grad_evals == len(ETAS) + 1


@pytest.mark.parametrize(
    "step_sizes",
    [[], [0.1, 0.0], [-0.5], [float("nan")], [float("inf")], [[0.1, 0.2]], ["a"], 0.1],
)
def test_bad_step_sizes(step_sizes):
    case = CASES["mlp-none"]()
    with pytest.raises(ValueError, match="step_sizes"):
        landscape_along_gradient(case.model, case.loss_fn, case.batches, step_sizes=step_sizes)


class Steep(nn.Module):
    """L(w) = exp(w²)·10: finite at w, overflowing to inf a large step away."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.w

    @staticmethod
    def loss_fn(w: Tensor, target: Tensor) -> Tensor:
        return 10 * torch.exp(w**2).sum()


def test_divergent_steps_are_recorded_not_raised():
    model = Steep()
    batch = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))
    r = landscape_along_gradient(model, Steep.loss_fn, batch, step_sizes=[1e-4, 100.0])
    assert np.isfinite(r.losses[0]) and np.isinf(r.losses[1])
    assert r.n_diverged == 1
    assert r.loss_range == math.inf and r.max_grad_distance == math.inf and r.beta_eff == math.inf
    assert model.w.item() == 1.0
    assert {row["metric"] for row in r.to_records()} >= {"loss", "beta_eff", "loss_range"}


def test_state_untouched_records_and_params_block():
    case = CASES["mlp-bn-running"]()
    model = case.model
    model.eval()
    model.blocks[0].train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = ModelState.capture(model)
    for bn in ("batch", "running"):
        r = landscape_along_gradient(model, case.loss_fn, case.batches, step_sizes=[0.1, 1.0], bn=bn)
        assert state.differences(model) == []
    rows = r.to_records()
    assert all(row["probe"] == "landscape" for row in rows)
    per_eta = [row for row in rows if "eta" in row]
    assert len(per_eta) == 2 * 4 and {row["eta"] for row in per_eta} == {0.1, 1.0}
    summary = {row["metric"]: row["value"] for row in rows if "eta" not in row}
    assert summary["beta_eff"] == r.beta_eff and summary["loss_range"] == r.loss_range
    # a block: only the head moves, the gradient is the head's
    head = landscape_along_gradient(
        model, case.loss_fn, case.batches, step_sizes=[0.5], params=model.head, bn="running"
    )
    _, g = plain_loss_and_grad(model, case.loss_fn, case.batches, "running")
    n_head = sum(p.numel() for p in model.head.parameters())
    assert head.grad_norm == pytest.approx(float(g[-n_head:].norm()), rel=1e-12)
    assert head.layer == "head.weight,head.bias"
    assert state.differences(model) == []
